"""Use a trained variant outside the pipeline: caption image files, or search images by text.

    from vlbench.inference import Captioner
    cap = Captioner.from_run("models/grid_transformer")
    cap.caption(["a.jpg", "b.jpg"])            # -> ["a red circle ...", ...]
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .models.trained import load_trained
from .models.protocols import AlignmentModel, CaptioningModel
from .models.registry import create_image_encoder
from .runtime import load_image, pick_device, to_tensor


class ImageError(ValueError):
    """An input file that is missing or not a readable image."""


def read_image(path: str, size: int):
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{path}: no such file")
    if p.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        return load_image(str(p), size)
    except Exception as e:  # PIL raises several types: unidentified, truncated, decompression bomb
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


class _Trained:
    def __init__(self, model_dir: str | Path, device: str = "auto"):
        self.device = pick_device(device)
        self.model, self.cfg, self.meta = load_trained(model_dir)
        self.model.to(self.device)
        self.encoder = create_image_encoder(self.meta["image_encoder"]).to(self.device).eval()
        self.image_size = self.meta["image_size"]  # the size its cached training features were made at

    @classmethod
    def from_run(cls, model_dir: str | Path = None, variant: str | None = None, device: str = "auto"):
        """A trained model folder (``models/<variant>`` by default for ``variant``)."""
        folder = Path(model_dir) if model_dir else Path("models") / variant
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no trained model here (run `dvc repro` or the train stage first)")
        return cls(folder, device)

    @torch.no_grad()
    def grid(self, images) -> torch.Tensor:
        x = torch.stack([to_tensor(im, self.encoder.mean, self.encoder.std) for im in images]).to(self.device)
        return self.encoder(x).half().float()  # same fp16 rounding as the cached training features


class Captioner(_Trained):
    model: CaptioningModel

    def caption(self, paths: list[str], decoding=None, seed: int = 0) -> list[str]:
        """One caption per path; raises ImageError for an unreadable one (see caption_each)."""
        images = [read_image(p, self.image_size) for p in paths]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return self.model.generate(self.grid(images), decoding or self.cfg.decoding, generator=gen)

    def caption_each(self, paths: list[str], decoding=None, seed: int = 0) -> list[str | ImageError]:
        """Caption what can be read; an ImageError in place of each file that cannot."""
        loaded, out = [], []
        for p in paths:
            try:
                loaded.append((p, read_image(p, self.image_size)))
                out.append(None)
            except ImageError as e:
                out.append(e)
        if loaded:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            caps = iter(self.model.generate(self.grid([im for _, im in loaded]), decoding or self.cfg.decoding, generator=gen))
            out = [next(caps) if o is None else o for o in out]
        return out

    def decoding(self, beam: int | None = None, top_p: float | None = None, temperature: float | None = None, max_len=None):
        d = self.cfg.decoding
        if beam:
            d = replace(d, strategy="beam", beam_size=beam)
        if top_p is not None or temperature is not None:
            d = replace(d, strategy="nucleus", top_p=top_p if top_p is not None else d.top_p,
                        temperature=temperature if temperature is not None else d.temperature)
        if max_len:
            d = replace(d, max_len=max_len)
        return d


class Searcher(_Trained):
    """Text -> images over an index of images (the test split by default): their cached features,
    or, for a variant that tuned its image encoder (``pixel_variants``), the image files."""

    model: AlignmentModel

    @torch.no_grad()
    def index(self, features: np.ndarray | None, paths: list[str], batch_size: int = 64) -> None:
        chunks = []
        for s in range(0, len(paths), batch_size):
            if features is not None:
                tokens = torch.from_numpy(np.array(features[s : s + batch_size])).to(self.device)
            else:
                images = [read_image(p, self.image_size) for p in paths[s : s + batch_size]]
                x = torch.stack([to_tensor(im, self.encoder.mean, self.encoder.std) for im in images]).to(self.device)
                tokens = self.model.image_tokens(x)
            chunks.append(self.model.embed_images(tokens))
        self.image_emb, self.paths = torch.cat(chunks), paths

    @torch.no_grad()
    def search(self, query: str, top: int = 5) -> list[tuple[str, float]]:
        q = self.model.embed_text_features(self.model.text_features([query], self.device))
        scores = (self.image_emb @ q[0]).cpu()
        best = scores.topk(min(top, len(scores)))
        return [(self.paths[i], s.item()) for s, i in zip(best.values, best.indices.tolist())]
