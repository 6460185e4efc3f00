"""What a train or evaluate stage feeds the model as images, by row of a split: the features
stage's cached token grids (``variants``), or pixels read from the image files
(``pixel_variants``, whose image encoder is tuned and so cannot be cached)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data.manifests import read_manifest
from .errors import ParamError
from .image_features import ImageFiles, encode_paths, load_features
from .models.registry import create_image_encoder, native_image_size


class CachedTokens:
    """Rows of ``<features>/<split>.npy``: token grids [T, C] (fp16 on disk)."""

    def __init__(self, features_dir: str | Path, split: str):
        self.array, self.ids = load_features(features_dir, split)
        self.meta = json.loads((Path(features_dir) / "meta.json").read_text())

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[rows]))

    def describe(self) -> dict:
        """What the model and its checkpoint need to know about these inputs."""
        return {"image_dim": int(self.array.shape[2]), "n_grid": int(self.array.shape[1]),
                "image_size": self.meta["image_size"], "input": "features"}


class Pixels:
    """Rows of a split's manifest as normalised pixels [3, S, S] for ``encoder``."""

    def __init__(self, splits_dir: str | Path, split: str, image_size: int | str, encoder):
        image_size = encoder.native_size if image_size == "native" else image_size
        df = read_manifest(splits_dir, split)
        self.ids, self.paths = list(df["image_id"]), list(df["path"])
        self.files = ImageFiles(self.paths, image_size, encoder.mean, encoder.std)
        with torch.no_grad():
            grid = encoder.eval()(torch.zeros(1, 3, image_size, image_size))
        self.image_size, self.dim, self.n_grid = image_size, int(grid.shape[2]), int(grid.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> torch.Tensor:
        return torch.stack([self.files[i] for i in rows])

    def describe(self) -> dict:
        return {"image_dim": self.dim, "n_grid": self.n_grid, "image_size": self.image_size, "input": "pixels"}


class FrozenBottom:
    """``image_tuning: top``: rows of ``pixels`` as the frozen bottom's output maps [C, H, W]
    (``model.image_bottom``), computed once here (fp16, in memory; 200 MB for Flickr8k's 6,000
    training images at Lite2's 260 px) instead of at every step: a step then costs the tuned top
    and the heads, not the whole tower. The model runs its top on them (``image_tokens``)."""

    def __init__(self, pixels: Pixels, model, device, split: str, batch_size: int = 32):
        self.pixels, self.ids = pixels, pixels.ids
        enc = model.image_encoder
        self.maps = encode_paths(model.image_bottom, pixels.paths, pixels.image_size, batch_size, device,
                                 desc=f"frozen image stages ({split})", mean=enc.mean, std=enc.std)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> torch.Tensor:
        return torch.from_numpy(self.maps[rows]).float()

    def describe(self) -> dict:
        return self.pixels.describe()  # the model saved still takes pixels


def open_inputs(split: str, splits_dir: str, features_dir: str | None, cfg):
    """Cached tokens when a features folder is given, else pixels at the variant's image size."""
    if features_dir:
        return CachedTokens(features_dir, split)
    return Pixels(splits_dir, split, cfg.image_size, create_image_encoder(cfg.image_encoder))


def check_features(features_dir: str | Path, backbone: str, backbone_key: str,
                   image_size: int | str | None = None, size_key: str = "features.image_size") -> dict:
    """Stop (ParamError, one line naming the key) unless ``features_dir`` holds features of image
    encoder ``backbone`` (at ``image_size`` pixels, or its ``native`` size, when given), as its meta.json records; -> the
    meta. Called by train and evaluate before any work: cached features of another encoder or size
    would train or score silently wrong. A folder whose meta.json does not record both was made by
    an older features stage: it has to be made again."""
    d = Path(features_dir)
    rerun = f"run the features stage for {backbone} (dvc repro features@{backbone}, or vlbench features --backbone {backbone} --out {d})"
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        raise ParamError(f"{backbone_key}: {d} holds no features (no meta.json): {rerun}") from None
    except ValueError:
        raise ParamError(f"{backbone_key}: {d}/meta.json is not readable JSON: {rerun}") from None
    if not isinstance(meta, dict) or "backbone" not in meta or "image_size" not in meta:
        raise ParamError(f"{backbone_key}: {d}/meta.json does not record the backbone and image size "
                         f"(made by an older version): {rerun}")
    if meta["backbone"] != backbone:
        raise ParamError(f"{backbone_key}: {backbone} but {d} holds features of {meta['backbone']}: "
                         f"pass the features folder of {backbone}, or {rerun}")
    said = image_size
    if image_size == "native":  # features.image_size: native, the backbone's own resolution
        image_size = native_image_size(backbone)
        said = f"native ({image_size} for {backbone})"
    if image_size is not None and meta["image_size"] != image_size:
        raise ParamError(f"{size_key}: {said} but {d} holds features of images resized to "
                         f"{meta['image_size']}: {rerun}")
    return meta
