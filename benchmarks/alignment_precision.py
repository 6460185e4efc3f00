"""Dual-encoder training with a tuned text tower, fp32 vs bf16 autocast (``train.precision: bf16``),
side by side in one process (issue 13).

    python benchmarks/alignment_precision.py [--images 128] [--batch-size 32] [--steps 4] [--rounds 3]
                                             [--root ../shared/data/flickr8k-224] [--only 1 2 3]

Text tuning: ``full`` (all 6 MiniLM layers), ``full`` with ``text_tune_layers: 2`` (the bottom
4 layers frozen, run without autograd) with the whole encoder run each step and, as the train stage
does it, with the frozen layers' output computed once per caption (``training.TunedTextCache``; its
one-off cost is the last column), the top layer alone likewise, ``lora`` (all layers) and ``lora`` on
the top 2 layers.
Each configuration trains two models from the same initial weights on the same batches, one in
fp32 and one under bf16 autocast, through the train stage's own step (``training.make_step``,
``accumulate``, gradient clipping, AdamW). Every run of every configuration steps in each round of
``--steps`` steps, in alternating order (first round: warm-up, not timed), so that load from other
jobs on the machine falls on all alike. Image side: real Flickr8k photos (``--root``, read in place) encoded once by
EfficientNet-Lite0 at 224 px into cached grids, as the pipeline does; random grids when the copy
is absent.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vlbench.models.variants import build_variant, create_variant_model
from vlbench.training import Batches, TunedTextCache, accumulate, amp_dtype, make_step

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # label -> (dual_encoder options, the frozen layers' output cached: training.TunedTextCache)
    "full": ({"text_tuning": "full"}, False),
    "full, top 2 layers, whole encoder each step": ({"text_tuning": "full", "text_tune_layers": 2}, False),
    "full, top 2 layers, frozen layers cached (the train stage's way)": ({"text_tuning": "full", "text_tune_layers": 2}, True),
    "full, top 1 layer, frozen layers cached": ({"text_tuning": "full", "text_tune_layers": 1}, True),
    "lora": ({"text_tuning": "lora"}, False),
    "lora, top 2 layers": ({"text_tuning": "lora", "text_tune_layers": 2}, False),
}


def flickr8k(n: int, root: Path) -> tuple[list[str], list[list[str]]] | None:
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    if not token.is_file():
        return None
    caps: dict[str, list[str]] = {}
    for line in token.read_text(encoding="utf-8").splitlines():
        key, _, text = line.partition("\t")
        caps.setdefault(key.split("#")[0], []).append(text.strip())
    names = [k for k in sorted(caps) if (root / "Flicker8k_Dataset" / k).is_file()][:n]
    return [str(root / "Flicker8k_Dataset" / k) for k in names], [caps[k] for k in names]


class Grids:
    """Cached token grids in the interface make_step reads (``inputs.batch(rows)``)."""

    def __init__(self, feats: np.ndarray):
        self.feats = torch.from_numpy(np.asarray(feats))

    def batch(self, rows):
        return self.feats[rows]


def data(a, device) -> tuple[Grids, list[list[str]], str]:
    found = flickr8k(a.images, Path(a.root))
    if found:
        from vlbench.image_features import encode_paths
        from vlbench.models.registry import create_image_encoder

        paths, captions = found
        feats = encode_paths(create_image_encoder("efficientnet_lite0"), paths, 224, 16, device, desc="Lite0 grids")
        return Grids(feats), captions, f"{len(paths)} Flickr8k photos (Lite0 grids at 224 px) and their captions"
    rng = np.random.default_rng(0)
    words = "a dog man woman child runs sits on the grass in water red blue ball street".split()
    captions = [[" ".join(rng.choice(words, 10)) for _ in range(5)] for _ in range(a.images)]
    feats = rng.random((a.images, 49, 1280), dtype=np.float32).astype(np.float16) * 6
    return Grids(feats), captions, f"{a.images} random grids and random 10-word captions"


class Run:
    """One model training under one precision, stepping on request."""

    def __init__(self, cfg, captions, inputs, device, precision: str, seed: int, cached: bool = False):
        torch.manual_seed(seed)
        self.model = create_variant_model(cfg, 1280, 49).to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(self.params, lr=1e-4)
        dtype = amp_dtype(precision, device)
        self.amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        t0 = time.perf_counter()
        cache = TunedTextCache(self.model, captions, device) if cached else None
        self.precompute_seconds = time.perf_counter() - t0
        self.step_fn = make_step(self.model, cfg, captions, cache, inputs, device)
        self.batches = Batches(len(captions), captions, cfg.optim.batch_size, seed)
        self.seconds, self.cpu_seconds, self.losses = [], [], []

    def train(self, steps: int, timed: bool) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            idx, cap_idx = self.batches.sample()
            self.optim.zero_grad(set_to_none=True)
            loss = accumulate(self.step_fn, idx, cap_idx, 1, self.amp, self.scaler, contextlib.nullcontext)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optim.step()
            self.losses.append(loss.item())
        if timed:
            self.seconds.append((time.perf_counter() - t0) / steps)
            self.cpu_seconds.append((time.process_time() - c0) / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per precision (after one warm-up round)")
    ap.add_argument("--root", default=str(ROOT / ".." / "shared" / "data" / "flickr8k-224"))
    ap.add_argument("--only", nargs="*", type=int, help="indices of CONFIGS to run (default: all); the "
                    "speed-up column compares with the first one run")
    a = ap.parse_args()
    device = torch.device("cpu")
    inputs, captions, what = data(a, device)
    built = []  # (label, {precision: Run}): every configuration's two runs, timed in the same rounds
    for k, (label, (options, cached)) in enumerate(CONFIGS.items()):
        if a.only and k not in a.only:
            continue
        cfg = build_variant("bench", {"model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                                      "text_encoder": "minilm_l6", "embed_dim": 256, **options,
                                      "optim": {"batch_size": a.batch_size}})
        built.append((label, {p: Run(cfg, captions, inputs, device, p, seed=0, cached=cached) for p in ("fp32", "bf16")}))
    every = [run for _, runs in built for run in runs.values()]
    for r in range(a.rounds + 1):  # each round steps every run, in alternating order: load falls on all alike
        for run in (every if r % 2 else every[::-1]):
            run.train(a.steps, timed=r > 0)
    rows = []
    for label, runs in built:
        trainable = sum(p.numel() for p in runs["fp32"].params)
        sps = {p: a.batch_size / statistics.median(run.seconds) for p, run in runs.items()}
        cpu = {p: statistics.median(run.cpu_seconds) for p, run in runs.items()}
        rows.append((label, trainable, sps["fp32"], sps["bf16"], cpu["fp32"] / cpu["bf16"],
                     runs["fp32"].losses[-1], runs["bf16"].losses[-1], runs["fp32"].precompute_seconds))
        print(f"{label}: fp32 {sps['fp32']:.1f} samples/s, bf16 {sps['bf16']:.1f}", flush=True)
    print(f"\nCPU x{len(os.sched_getaffinity(0))} ({platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {what}; batch {a.batch_size}, {a.rounds} rounds of {a.steps} steps "
          f"per precision after one warm-up round (median round)")
    base = rows[0][2]
    print("| text tuning | trainable params | fp32 samples/s | vs first row, fp32 | bf16 samples/s | bf16 speed-up, wall | "
          f"bf16 speed-up, CPU time | loss after {(a.rounds + 1) * a.steps} steps, fp32 / bf16 | one-off cache s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, n, f32, b16, cpu_ratio, l32, l16, pre in rows:
        print(f"| {label} | {n / 1e6:.2f}M | {f32:.1f} | {f32 / base:.2f}x | {b16:.1f} | {b16 / f32:.2f}x | {cpu_ratio:.2f}x | "
              f"{l32:.3f} / {l16:.3f} | {pre:.1f} |")


if __name__ == "__main__":
    main()
