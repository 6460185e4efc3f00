"""Caption decoding: one image at a time without a KV cache (re-running the whole prefix each
step) vs batched without a cache vs batched with the KV cache (the evaluate stage's path), with
the same trained model and decoding settings, in one process.

    python benchmarks/decoding_throughput.py --variant grid_transformer [--images 128]

Needs a trained variant (models/<variant>, e.g. after `dvc repro`) and its cached test features.
Targets: batched >= 5x per-image (issue 7); the KV cache gives the same captions (issue 5).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import numpy as np
import torch

from vlbench.image_features import load_features
from vlbench.models.trained import load_trained


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


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
    print("| decoding | per-image, no cache (captions/s) | batched, no cache | batched + KV cache | "
          "speed-up | identical captions |\n|---|---|---|---|---|---|")

    def batched(dec, use_cache):
        return [c for s in range(0, len(grid), a.batch_size)
                for c in model.generate(grid[s : s + a.batch_size], dec, use_cache=use_cache)]

    for dec in (replace(cfg.decoding, strategy="greedy"), replace(cfg.decoding, strategy="beam", beam_size=3)):
        model.generate(grid[:2], dec)  # warm-up
        single, t_single = timed(lambda: [model.generate(grid[i : i + 1], dec, use_cache=False)[0] for i in range(len(grid))])
        full, t_full = timed(lambda: batched(dec, use_cache=False))
        cached, t_cached = timed(lambda: batched(dec, use_cache=True))
        same = sum(x == y == z for x, y, z in zip(single, full, cached))
        label = dec.strategy + (f" (width {dec.beam_size})" if dec.strategy == "beam" else "")
        n = len(grid)
        print(f"| {label} | {n / t_single:.1f} | {n / t_full:.1f} | {n / t_cached:.1f} | "
              f"{t_single / t_cached:.2f}x | {same}/{n} |")


if __name__ == "__main__":
    main()
