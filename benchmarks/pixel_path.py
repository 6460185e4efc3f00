"""Pixel variants' image tower on CPU: NCHW (PyTorch's default) vs channels-last (NHWC), and the
``image_tuning: top`` step over cached maps vs the same step from pixels.

    python benchmarks/pixel_path.py [--encoder efficientnet_lite2] [--batch 32] [--rounds 3]

Rows, timed in alternating rounds in one process (median round), on random pixels at the
encoder's native size:
- evaluation: the tower's forward under inference_mode (what evaluation and search run per image);
- LoRA training: forward + backward with the pixel variant's LoRA adapters (``clip_lite0_lora_e2e``'s
  target modules), the step of ``image_tuning: lora``;
- top tuning: forward + backward of the last stage + head conv, from pixels (the bottom under
  no_grad every step) vs from the frozen bottom's maps (``inputs.FrozenBottom``: the train stage's way).
The "vs first" column is each row's speed-up over the first row of its group. ``DualEncoder``
builds its image encoder channels-last, so evaluation, search and the pixel training paths take
the second row of each group.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet_lite2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, inject_adapter_in_model

    from vlbench.models.registry import create_image_encoder
    from vlbench.runtime import configure_threads

    threads = configure_threads()
    formats = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}

    def encoder(fmt, lora: bool = False):  # one copy per memory format, converted once
        enc = create_image_encoder(a.encoder).eval().requires_grad_(False)
        if lora:
            inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["conv_pwl"]), enc.backbone)
        return enc.to(memory_format=fmt)

    size = create_image_encoder(a.encoder).native_size
    x = torch.randn(a.batch, 3, size, size)

    def forward(fmt):
        enc = encoder(fmt)

        def run():
            with torch.inference_mode():
                enc(x.contiguous(memory_format=fmt))
        return run

    def lora_step(fmt):
        enc = encoder(fmt, lora=True)

        def run():
            enc(x.contiguous(memory_format=fmt)).float().mean().backward()
        return run

    top_enc = encoder(torch.channels_last)
    bottom, top = top_enc.split_top(1)
    top.requires_grad_(True)
    with torch.inference_mode():
        maps = bottom(x.contiguous(memory_format=torch.channels_last)).clone()

    def top_from_pixels():
        with torch.no_grad():
            m = bottom(x.contiguous(memory_format=torch.channels_last))
        top(m).float().mean().backward()

    def top_from_maps():
        top(maps.clone().contiguous(memory_format=torch.channels_last)).float().mean().backward()

    groups = {
        "evaluation (forward)": {f"{n}": forward(f) for n, f in formats.items()},
        "LoRA training (forward + backward)": {f"{n}": lora_step(f) for n, f in formats.items()},
        "top tuning (forward + backward), channels-last": {"from pixels": top_from_pixels, "from cached maps": top_from_maps},
    }
    seconds = {g: {r: [] for r in rows} for g, rows in groups.items()}
    for g, rows in groups.items():
        for fn in rows.values():
            fn()  # warm-up: oneDNN picks its kernels
        for _ in range(a.rounds):  # alternate the rows of a group, round by round
            for r, fn in rows.items():
                seconds[g][r].append(_once(fn))
    print(f"\n{a.encoder} at {size} px, batch {a.batch}, {threads} threads, median of {a.rounds} rounds\n")
    print("| group | row | s per batch | images/s | vs first |")
    print("|---|---|---|---|---|")
    for g, rows in seconds.items():
        first = None
        for r, times in rows.items():
            s = statistics.median(times)
            first = first or s
            print(f"| {g} | {r} | {s:.2f} | {a.batch / s:.1f} | {first / s:.2f}x |")


if __name__ == "__main__":
    main()
