"""The evaluate stage's metric code vs the per-item loops the copied notebooks use, in one process.

1. Caption scoring: ``metrics.caption.caption_metrics`` scores all captions in one call (one PTB
   tokenizer run, one METEOR Java process) vs calling it once per image, as a loop over a
   DataLoader does. The per-image baseline is timed on ``--baseline-images`` images (it starts
   Java twice per image) and compared per caption.
2. Retrieval ranks: ``metrics.retrieval.ranks`` (one similarity matmul, chunked) vs a Python
   loop over queries, on n_images x 5 n_images embeddings.

    python benchmarks/evaluate_throughput.py [--captions 5000] [--baseline-images 40]

Hypotheses and references are real Flickr8k captions when the shared copy exists (each image's
first caption scored against its other four), else generated-scene captions.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from vlbench.metrics.caption import caption_metrics
from vlbench.metrics.retrieval import ranks

ROOT = Path(__file__).resolve().parents[1]


def captions_by_image(n: int, root: Path) -> dict[str, list[str]]:
    token_file = root / "Flickr8k_text" / "Flickr8k.token.txt"
    out: dict[str, list[str]] = {}
    if token_file.is_file():
        for line in token_file.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, caption = line.partition("\t")
            out.setdefault(key.split("#")[0], []).append(caption.strip())
            if len(out) > n:
                break
    else:
        from vlbench.data import shapes

        out = {name: caps for name, _, caps in shapes.generate(n, 32, seed=0)}
    return dict(list((k, v) for k, v in out.items() if len(v) >= 2)[:n])


def naive_ranks(sim: torch.Tensor, owner: torch.Tensor) -> list[int]:
    """Per text query: sort all images, find the position of the true one (tutorial style)."""
    out = []
    for j in range(sim.shape[1]):
        order = torch.argsort(sim[:, j], descending=True).tolist()
        out.append(order.index(int(owner[j])) + 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=5000, help="generated captions to score (one per image)")
    ap.add_argument("--baseline-images", type=int, default=40, help="images the per-image baseline scores")
    ap.add_argument("--root", default=str(ROOT / ".." / "shared" / "data" / "flickr8k-224"))
    a = ap.parse_args()
    data = captions_by_image(a.captions, Path(a.root))
    hyps = {k: v[0] for k, v in data.items()}
    refs = {k: v[1:] for k, v in data.items()}

    t0 = time.perf_counter()
    caption_metrics(refs, hyps, spice=False)
    t_once = time.perf_counter() - t0
    some = list(data)[: a.baseline_images]
    t0 = time.perf_counter()
    for k in some:
        caption_metrics({k: refs[k]}, {k: hyps[k]}, spice=False)
    t_each = time.perf_counter() - t0

    n_img = 1000
    torch.manual_seed(0)
    owner = torch.arange(n_img).repeat_interleave(5)
    img = torch.nn.functional.normalize(torch.randn(n_img, 256), dim=-1)
    txt = torch.nn.functional.normalize(img[owner] + 0.8 * torch.randn(len(owner), 256), dim=-1)
    sim = img @ txt.t()
    t0 = time.perf_counter()
    _, t2i = ranks(sim, owner)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = naive_ranks(sim, owner)
    t_loop = time.perf_counter() - t0
    assert t2i.tolist() == slow, "the two rank computations disagree"

    machine = f"CPU x{os.cpu_count()} ({platform.machine()})"
    print(f"\nmachine: {machine}; torch {torch.__version__}")
    print("| task | baseline (per item) | evaluate stage | ratio |\n|---|---|---|---|")
    rate_each, rate_once = len(some) / t_each, len(hyps) / t_once
    print(f"| caption metrics, captions/s ({len(hyps)} captions; baseline on {len(some)}) | {rate_each:.1f} | "
          f"{rate_once:.1f} | {rate_once / rate_each:.0f}x |")
    print(f"| retrieval ranks, text queries/s ({n_img} images x {len(owner)} captions) | {len(owner) / t_loop:.0f} | "
          f"{len(owner) / t_vec:.0f} | {t_loop / t_vec:.0f}x |")
    print(f"\nscoring all {len(hyps)} captions once: {t_once:.1f} s")


if __name__ == "__main__":
    main()
