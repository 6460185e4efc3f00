"""Stage `features`: run one image encoder over every split once and cache its token grids.

Writes ``<out>/<split>.npy`` (float16, [N, T, C], memory-mapped by training) and
``<out>/<split>_ids.json`` (image ids in row order), plus ``<out>/meta.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import io
from ..config import ParamError, load_params, section
from ..models.registry import create_image_encoder
from ..runtime import load_image, pick_device, to_tensor
from .split import SPLITS, read_manifest


class ImageFiles(Dataset):
    def __init__(self, paths: list[str], size: int, mean, std):
        self.paths, self.size, self.mean, self.std = paths, size, mean, std

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return to_tensor(load_image(self.paths[i], self.size), self.mean, self.std)


@torch.inference_mode()
def encode_paths(encoder, paths: list[str], image_size: int, batch_size: int, device, desc: str = "features") -> np.ndarray:
    """Batched, channels-last (1.7x on CPU too), autocast on GPU; returns float16 [N, T, C].
    Decoding workers only with a GPU: on a small CPU they take cores from the encoder."""
    workers = min(4, (os.cpu_count() or 1) - 1, len(paths) // batch_size) if device.type == "cuda" else 0
    loader = DataLoader(
        ImageFiles(paths, image_size, encoder.mean, encoder.std),
        batch_size=batch_size,
        num_workers=max(0, workers),
        pin_memory=device.type == "cuda",
    )
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    out = None
    row = 0
    for x in tqdm(loader, desc=desc, unit="batch"):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder(x)
        tokens = tokens.float().cpu().numpy().astype(np.float16)
        if out is None:
            out = np.empty((len(paths), *tokens.shape[1:]), dtype=np.float16)
        out[row : row + len(tokens)] = tokens
        row += len(tokens)
    return out


def load_features(features_dir: str | Path, split: str) -> tuple[np.ndarray, list[str]]:
    d = Path(features_dir)
    return np.load(d / f"{split}.npy", mmap_mode="r"), json.loads((d / f"{split}_ids.json").read_text())


def run(params_path: str, backbone: str, splits_dir: str, out: str) -> None:
    cfg = section(load_params(params_path), "features")
    if backbone not in cfg.backbones:
        raise ParamError(f"features.backbones: {backbone!r} is not listed ({cfg.backbones})")
    device = pick_device()
    encoder = create_image_encoder(backbone)
    meta = {"backbone": backbone, "image_size": cfg.image_size, "dim": encoder.dim, "splits": {}}
    with io.atomic_dir(out) as tmp:
        for split in SPLITS:
            df = read_manifest(splits_dir, split)
            t0 = time.perf_counter()
            feats = encode_paths(encoder, list(df["path"]), cfg.image_size, cfg.batch_size, device, desc=f"{backbone} {split}")
            meta["splits"][split] = {"images": len(df), "shape": list(feats.shape), "seconds": round(time.perf_counter() - t0, 2)}
            np.save(tmp / f"{split}.npy", feats)
            io.write_json(tmp / f"{split}_ids.json", list(df["image_id"]))
        io.write_json(tmp / "meta.json", meta)
    print(json.dumps(meta))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads section `features`)")
    ap.add_argument("--backbone", required=True, help="image encoder name from features.backbones")
    ap.add_argument("--splits", default="data/splits", help="folder written by the split stage")
    ap.add_argument("--out", required=True, help="output folder, e.g. data/features/<backbone>")
    a = ap.parse_args(argv)
    run(a.params, a.backbone, a.splits, a.out)
