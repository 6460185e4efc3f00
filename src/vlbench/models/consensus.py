"""Consensus re-ranking of a beam search's beams (``decoding.rerank_neighbours``).

A captioner's beams often differ in ways its log-probabilities cannot judge; the captions of the
training images that look most like the image can (Devlin et al. 2015, "Exploring Nearest Neighbor
Approaches for Image Captioning"; Mao et al.'s consensus re-ranking). Each beam is scored by its
CIDEr-D against the captions of the k training images nearest to the image (cosine similarity of
mean-pooled image tokens, as the nearest-neighbour baseline; CIDEr-D document frequencies of the
training captions only), and the beams are re-ranked by

    z(beam search's ranking score) + rerank_weight * z(that CIDEr-D)

with z the standard score over one image's beams, so the weight does not depend on the scale of
either. The training images' pooled features and captions travel with the trained model
(``neighbours.safetensors``, ``neighbours.json`` in its folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import io
from ..metrics.cider_d import CiderD

FEATURES, CAPTIONS = "neighbours.safetensors", "neighbours.json"


def pooled_image_features(grids: Iterable[torch.Tensor]) -> torch.Tensor:
    """Image token grids [B, N, D] (batches) -> unit-length mean-pooled features [sum B, D], fp32."""
    return torch.cat([F.normalize(g.float().mean(1), dim=-1) for g in grids])


def standard_scores(x: torch.Tensor) -> torch.Tensor:
    """z-scores along the last axis; a row with no spread scores 0 everywhere."""
    std = x.std(-1, unbiased=False, keepdim=True)
    return torch.where(std > 0, (x - x.mean(-1, keepdim=True)) / std.clamp_min(1e-12), torch.zeros_like(x))


class NeighbourCaptions:
    """The training images' pooled features [N, D] (unit length) and their captions."""

    def __init__(self, features: torch.Tensor, captions: Sequence[Sequence[str]]):
        if len(features) != len(captions):
            raise ValueError(f"{len(features)} neighbour features but {len(captions)} caption lists")
        self.features, self.captions = features, [list(c) for c in captions]
        self._cider = None

    @classmethod
    def from_inputs(cls, inputs, captions: Sequence[Sequence[str]], chunk: int = 1024) -> "NeighbourCaptions":
        """From the training split's cached image tokens (inputs.batch) and its captions, row for row."""
        rows = (range(s, min(s + chunk, len(inputs))) for s in range(0, len(inputs), chunk))
        return cls(pooled_image_features(inputs.batch(r) for r in rows).half(), captions)

    def save(self, folder: Path) -> None:
        with io.atomic_path(Path(folder) / FEATURES) as tmp:
            save_file({"features": self.features.contiguous().cpu()}, str(tmp))
        io.write_json(Path(folder) / CAPTIONS, self.captions)

    @classmethod
    def load(cls, folder: Path) -> "NeighbourCaptions | None":
        """The bank saved in a trained model's folder, or None where it has none."""
        folder = Path(folder)
        if not (folder / FEATURES).exists():
            return None
        return cls(load_file(str(folder / FEATURES))["features"], json.loads((folder / CAPTIONS).read_text()))

    @property
    def cider(self) -> CiderD:
        if self._cider is None:  # document frequencies of the training captions, built on first use
            self._cider = CiderD(self.captions)
        return self._cider

    def nearest(self, grid: torch.Tensor, k: int) -> list[list[str]]:
        """Each image's k nearest training images' captions, pooled into one reference list."""
        sims = pooled_image_features([grid.cpu()]) @ self.features.float().t()
        picks = sims.topk(min(k, len(self.captions)), dim=-1).indices.tolist()
        return [[c for j in row for c in self.captions[j]] for row in picks]

    def rerank(self, grid: torch.Tensor, beams: Sequence[str], ranking: torch.Tensor, k: int,
               weight: float) -> list[str]:
        """``beams``: every image's final beams (item-major, as beam_search_all), ``ranking`` [B, beam]
        their ranking scores -> each image's chosen caption."""
        b, beam = ranking.shape
        references = self.nearest(grid, k)
        agreement = torch.from_numpy(self.cider.scores(beams, [r for r in references for _ in range(beam)])).float()
        agreement = agreement.view(b, beam)
        ranking = ranking.float().cpu()
        finite = torch.isfinite(ranking)
        z = standard_scores(torch.where(finite, ranking, ranking[finite].min() if finite.any() else 0.0))
        combined = torch.where(finite, z + weight * standard_scores(agreement), torch.tensor(float("-inf")))
        return [beams[i * beam + j] for i, j in enumerate(combined.argmax(-1).tolist())]
