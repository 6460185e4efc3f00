"""Caption decoding: batched generation (the evaluate stage's path) vs one image at a time, with
the same trained model and decoding settings, in one process.

    python benchmarks/decoding_throughput.py --variant grid_transformer [--images 128]

Needs a trained variant (models/<variant>, e.g. after `dvc repro`) and its cached test features.
Target (issue 7): batched >= 5x per-image.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import numpy as np
import torch

from vlbench.models.factory import load_trained
from vlbench.stages.features import load_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="grid_transformer")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    model, cfg, meta = load_trained(f"models/{a.variant}")
    feats, _ = load_features(f"data/features/{meta['image_encoder']}", "test")
    grid = torch.from_numpy(np.array(feats[: a.images]))
    print(f"device: CPU x{os.cpu_count()} ({platform.machine()}); torch {torch.__version__}; "
          f"{a.variant}, {len(grid)} images")
    print("| decoding | per-image captions/s | batched captions/s | ratio |\n|---|---|---|---|")
    for dec in (replace(cfg.decoding, strategy="greedy"), replace(cfg.decoding, strategy="beam", beam_size=3)):
        model.generate(grid[:2], dec)  # warm-up
        t0 = time.perf_counter()
        single = [model.generate(grid[i : i + 1], dec)[0] for i in range(len(grid))]
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = [c for s in range(0, len(grid), a.batch_size) for c in model.generate(grid[s : s + a.batch_size], dec)]
        t_batched = time.perf_counter() - t0
        same = sum(x == y for x, y in zip(single, batched))
        label = dec.strategy + (f" (width {dec.beam_size})" if dec.strategy == "beam" else "")
        print(f"| {label} | {len(grid) / t_single:.1f} | {len(grid) / t_batched:.1f} | {t_single / t_batched:.2f}x |"
              f"  ({same}/{len(grid)} identical captions)")


if __name__ == "__main__":
    main()
