"""One training step of the two captioners on a frozen SmolLM2-135M, in the options that make it
cheaper, each against the current shape of its family, side by side in one process (issue 14).

    python benchmarks/captioner_step.py [--images 128] [--batch-size 16] [--steps 3] [--rounds 3]
                                        [--root ../shared/data/flickr8k-224]

vision_prefix: one prefix token per grid cell (the first-look default's shape, the baseline) vs
ClipCap's ``prefix_length: 10``, in fp32 and under bf16 autocast. cross_attention_lm: gated
cross-attention before every 2nd LM layer (the baseline) vs every 3rd and every 6th, fp32 and bf16.
Each configuration trains its own model through the train stage's step (``training.make_step``,
``accumulate``, clipping, AdamW) on the same batches of real Flickr8k photos (EfficientNet-Lite0
grids at 224 px, encoded once as the pipeline caches them) and their captions. The timed rounds
alternate between the configurations of a family, so load from other jobs falls on all alike.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import torch

from alignment_precision import Run, data  # same folder: the real-photo grids and the timed training run
from vlbench.models.variants import build_variant

ROOT = Path(__file__).resolve().parents[1]
LM = {"image_encoder": "efficientnet_lite0", "language_model": "smollm2_135m", "decoding": {"strategy": "greedy"}}
FAMILIES = {  # family -> [(label, options, precision)], the first is the baseline
    "vision_prefix": [
        ("one prefix token per grid cell (49), fp32", {"prefix_hidden": 1024}, "fp32"),
        ("prefix_length 10, fp32", {"prefix_hidden": 1024, "prefix_length": 10}, "fp32"),
        ("prefix_length 10, bf16 autocast", {"prefix_hidden": 1024, "prefix_length": 10}, "bf16"),
    ],
    "cross_attention_lm": [
        ("cross-attention every 2nd layer, fp32", {"every_n_layers": 2, "heads": 8}, "fp32"),
        ("every 3rd layer, fp32", {"every_n_layers": 3, "heads": 8}, "fp32"),
        ("every 6th layer, fp32", {"every_n_layers": 6, "heads": 8}, "fp32"),
        ("every 3rd layer, bf16 autocast", {"every_n_layers": 3, "heads": 8}, "bf16"),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (after one warm-up round)")
    ap.add_argument("--root", default=str(ROOT / ".." / "shared" / "data" / "flickr8k-224"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cpu")
    inputs, captions, what = data(a, device)
    rows = []
    for family, configs in FAMILIES.items():
        runs = []
        for label, options, precision in configs:
            cfg = build_variant("bench", {"model": family, **LM, **options, "optim": {"batch_size": a.batch_size}})
            runs.append((label, precision, Run(cfg, captions, inputs, device, precision, seed=0)))
        for r in range(a.rounds + 1):
            for _, _, run in (runs if r % 2 else runs[::-1]):
                run.train(a.steps, timed=r > 0)
        base = statistics.median(runs[0][2].seconds)
        for label, precision, run in runs:
            s = statistics.median(run.seconds)
            rows.append((family, label, sum(p.numel() for p in run.params), s, a.batch_size / s, base / s,
                         run.losses[-1]))
            print(f"{family}, {label}: {s:.2f} s/step", flush=True)
    print(f"\nCPU x{len(os.sched_getaffinity(0))} ({platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {what}; batch {a.batch_size}, {a.rounds} rounds of {a.steps} steps "
          f"per configuration after one warm-up round (median round)")
    print(f"| model | configuration | trainable params | s / step | captions/s | speed-up vs its family's first row | "
          f"loss after {(a.rounds + 1) * a.steps} steps |")
    print("|---|---|---|---|---|---|---|")
    for family, label, n, s, cps, ratio, loss in rows:
        print(f"| {family} | {label} | {n / 1e6:.2f}M | {s:.2f} | {cps:.1f} | {ratio:.2f}x | {loss:.3f} |")


if __name__ == "__main__":
    main()
