"""Feature precompute: the features stage's batched encoder (DataLoader workers, inference_mode,
channels-last, fp16 output) vs a naive per-image loop with the same model, in one process.

    python benchmarks/features_throughput.py [--images 256] [--size 224] [--root ../shared/data/flickr8k-224]

Uses real Flickr8k photos when --root (default: the shared copy) exists, else generated scenes.
Target (issue 7): batched >= 3x naive on the same machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vlbench.image_features import encode_paths
from vlbench.models.registry import create_image_encoder
from vlbench.runtime import load_image, pick_device, to_tensor

ROOT = Path(__file__).resolve().parents[1]


def image_paths(n: int, root: Path) -> list[str]:
    photos = root / "Flicker8k_Dataset"
    if photos.is_dir():
        return [str(p) for p in sorted(photos.glob("*.jpg"))[:n]]
    from vlbench.data import shapes

    tmp = Path(tempfile.mkdtemp())
    out = []
    for name, img, _ in shapes.generate(n, 224, seed=0):
        img.save(tmp / name)
        out.append(str(tmp / name))
    return out


def naive(encoder, paths, size, device) -> None:
    encoder.eval()
    with torch.no_grad():
        for p in paths:
            x = to_tensor(load_image(p, size), encoder.mean, encoder.std)[None].to(device)
            encoder(x).cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--root", default=str(ROOT / ".." / "shared" / "data" / "flickr8k-224"))
    a = ap.parse_args()
    device = pick_device()
    paths = image_paths(a.images, Path(a.root))
    plain = create_image_encoder(a.backbone).to(device)  # separate instances: the stage converts
    encoder = create_image_encoder(a.backbone).to(device)  # its model to channels-last in place
    naive(plain, paths[:8], a.size, device)  # warm-up both paths
    encode_paths(encoder, paths[:8], a.size, 8, device, desc="warm-up")
    t0 = time.perf_counter()
    naive(plain, paths, a.size, device)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    encode_paths(encoder, paths, a.size, a.batch_size, device, desc="batched")
    t_batched = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()} ({platform.machine()})"
    print(f"\ndevice: {name}; torch {torch.__version__}; {len(paths)} images at {a.size}px; {a.backbone}")
    print("| method | images/s |\n|---|---|")
    print(f"| naive per-image loop | {len(paths) / t_naive:.1f} |")
    print(f"| features stage (batched) | {len(paths) / t_batched:.1f} |")
    print(f"\nratio batched / naive: {t_naive / t_batched:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
