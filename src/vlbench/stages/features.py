"""Stage `features`: run one image encoder over every split once and cache its token grids.

Writes ``<out>/<split>.npy`` (float16, [N, T, C], memory-mapped by training) and
``<out>/<split>_ids.json`` (image ids in row order), plus ``<out>/meta.json`` (backbone, the image
size used: ``features.image_size``, or with ``native`` the backbone's own resolution, and dims).

Resumable: images are encoded in shards, each saved atomically under
``checkpoints/features/<backbone>/`` (outside DVC's outs, so a rerun keeps them). An interrupted
run started again encodes only the missing shards; shards made under other settings are discarded.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import io
from ..data.manifests import SPLITS, read_manifest
from ..errors import ParamError
from ..image_features import encode_paths
from ..models.registry import create_image_encoder, resolve_image_size
from ..params import load_params, section
from ..runtime import configure_threads, fault_point, fingerprint, pick_device


class Shards:
    """Completed shards of one backbone's features, saved atomically, reused on a rerun."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = folder
        stamp = folder / "fingerprint"
        if folder.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            shutil.rmtree(folder)  # made under other settings: start afresh
        folder.mkdir(parents=True, exist_ok=True)
        io.write_text(stamp, fingerprint)

    def path(self, split: str, i: int) -> Path:
        return self.folder / f"{split}_{i:05d}.npy"

    def load(self, split: str, i: int) -> np.ndarray | None:
        p = self.path(split, i)
        return np.load(p) if p.is_file() else None

    def save(self, split: str, i: int, arr: np.ndarray) -> None:
        with io.atomic_path(self.path(split, i)) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run(params_path: str, backbone: str, splits_dir: str, out: str, shards_dir: str | None = None) -> None:
    cfg = section(load_params(params_path), "features")
    if backbone not in cfg.backbones:
        raise ParamError(f"features.backbones: {backbone!r} is not listed ({cfg.backbones})")
    device = pick_device()
    encoder = create_image_encoder(backbone)
    size = resolve_image_size(cfg.image_size, backbone)  # `native`: the backbone's own resolution
    manifests = {split: read_manifest(splits_dir, split) for split in SPLITS}
    shard_size = cfg.batch_size * max(1, 512 // cfg.batch_size)  # whole batches: same results resumed or not
    key = fingerprint(backbone, size, shard_size, str(device), {k: list(v["path"]) for k, v in manifests.items()})
    shards = Shards(Path(shards_dir or f"checkpoints/features/{backbone}"), key)
    written = reused = 0
    meta = {"backbone": backbone, "image_size": size, "image_size_param": cfg.image_size, "dim": encoder.dim, "splits": {}}
    with io.atomic_dir(out) as tmp:
        for split, df in manifests.items():
            paths, parts = list(df["path"]), []
            t0 = time.perf_counter()
            with tqdm(total=len(paths), desc=f"{backbone} {split}", unit="img") as bar:
                for i, s in enumerate(range(0, len(paths), shard_size)):
                    part = shards.load(split, i)
                    if part is None:
                        part = encode_paths(encoder, paths[s : s + shard_size], size, cfg.batch_size, device, bar=bar)
                        shards.save(split, i, part)
                        written += 1
                        fault_point(written)
                    else:
                        reused += 1
                        bar.update(len(part))
                    parts.append(part)
            feats = np.concatenate(parts)
            meta["splits"][split] = {"images": len(df), "shape": list(feats.shape), "seconds": round(time.perf_counter() - t0, 2)}
            np.save(tmp / f"{split}.npy", feats)
            io.write_json(tmp / f"{split}_ids.json", list(df["image_id"]))
        io.write_json(tmp / "meta.json", meta)
    shards.remove()
    if reused:
        print(f"vlbench features: resumed, reused {reused} completed shard(s)", file=sys.stderr)
    print(json.dumps(meta))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads section `features`)")
    ap.add_argument("--backbone", required=True, help="image encoder name from features.backbones")
    ap.add_argument("--splits", default="data/splits", help="folder written by the split stage")
    ap.add_argument("--out", required=True, help="output folder, e.g. data/features/<backbone>")
    ap.add_argument("--shards", default=None, help="resume folder (default checkpoints/features/<backbone>)")
    a = ap.parse_args(argv)
    configure_threads()  # VLBENCH_JOBS: jobs sharing the cores
    run(a.params, a.backbone, a.splits, a.out, a.shards)
