"""Dev-split experiment: does tuning the top of the image tower lift retrieval over its frozen grid?

EfficientNet-Lite2's last block and 1x1 head conv (1.2M of its 4.8M convolutional weights, 9x9 maps)
are tuned together with the dual encoder, over cached activations of the frozen blocks below: the
frozen part runs once per image, as the text side's frozen layers do for `text_tune_layers`, so a
step costs the top block and the heads instead of the whole tower (~20x a cached step).

    python benchmarks/image_top_tuning.py --splits data/splits [--steps 1000] [--seeds 0 1 2] \
        [--cache checkpoints/image_top] [--text-tune-layers 2 --lr 3e-4 --steps 800] \
        [--out benchmarks/flickr8k/image_top_tuning.json]
    python benchmarks/image_top_tuning.py --table benchmarks/flickr8k/image_top_tuning.json

Rows, each trained the same steps, batch, learning rate and seeds, side by side in one process:
the frozen grid (the top runs without gradients: the pipeline's `clip_lite2_minilm`, attention
pooling, InfoNCE, frozen MiniLM), the top tuned, and (``--mirror``) the top tuned on maps
mirrored left-right at random (an augmentation that cached grids otherwise lack).
``--text-tune-layers N`` tunes MiniLM's top N layers in every row too (the pipeline's
``clip_lite2_minilm_top2`` with N = 2, its frozen layers cached as the train stage does). The model, the
text cache, batches, learning-rate schedule and dev metric are the train stage's (vlbench.training,
vlbench.selection); bf16 autocast as configs/flickr8k.yaml. BatchNorm keeps its ImageNet statistics.
Prints a table (best dev rsum over all dev images, its step, the difference to the frozen row, and
seconds per training step; the frozen row runs the top forward too, which the pipeline's cached
grids skip) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

BACKBONE = "efficientnet_lite2"
VARIANT = {"model": "dual_encoder", "image_encoder": BACKBONE, "image_pooling": "attention", "text_encoder": "minilm_l6",
           "text_pooling": "mean", "embed_dim": 512, "head": "mlp", "loss": "infonce"}


class Tower:
    """The frozen bottom (stem + all blocks but the last) and the tunable top (last block, head conv,
    its BatchNorm) of a timm EfficientNet: ``ImageEncoder.split_top``, as ``image_tuning: top`` splits it."""

    def __init__(self):
        from vlbench.models.registry import create_image_encoder

        self.encoder = create_image_encoder(BACKBONE).eval()
        self.bottom, self.top = self.encoder.split_top(1)

    def fresh_top(self) -> torch.nn.Module:
        import copy

        return copy.deepcopy(self.top).eval()  # eval: BatchNorm keeps its ImageNet statistics


def cached_bottom(tower: Tower, splits: str, split: str, cache: Path) -> np.ndarray:
    """The frozen bottom's output maps [N, C, H, W] (float16) of a split's images, computed once
    (``encode_paths``, as the train stage's ``FrozenBottom`` computes them)."""
    from vlbench.data.manifests import read_manifest
    from vlbench.image_features import encode_paths
    from vlbench.models.registry import NATIVE_SIZES

    paths = list(read_manifest(splits, split)["path"])
    f = cache / f"{split}_bottom.npy"
    if f.exists():
        maps = np.load(f, mmap_mode="r")
        if len(maps) == len(paths):
            return maps
    enc = tower.encoder
    maps = encode_paths(tower.bottom, paths, NATIVE_SIZES[BACKBONE], 32, torch.device("cpu"),
                        desc=f"{BACKBONE} bottom ({split})", mean=enc.mean, std=enc.std)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{split}_bottom.npy"
    np.save(tmp, maps)
    os.replace(tmp, f)  # never a half-written cache
    return np.load(f, mmap_mode="r")


class TopTokens:
    """``inputs`` for the train stage's step and dev metric: rows of cached bottom maps through the
    (tuned or frozen) top -> tokens [B, 81, 1280]."""

    def __init__(self, maps: np.ndarray, ids: list[str], top: torch.nn.Module, mirror: bool, seed: int):
        self.maps, self.ids, self.top, self.mirror = maps, ids, top, mirror
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.maps[list(rows)])).float()
        if self.mirror and torch.is_grad_enabled():  # training only: the dev metric runs under no_grad
            flip = torch.rand(len(x), generator=self.gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.top(x).flatten(2).transpose(1, 2)


def print_table(data: dict) -> None:
    """The markdown table of a run (``data`` as written to --out); adds each row's mean and its
    difference to the first (frozen) row."""
    a = argparse.Namespace(**data["args"])
    table = data["rows"]
    base = statistics.mean(r["dev_rsum"] for r in table[0]["runs"])
    text = f"MiniLM's top {a.text_tune_layers} layers tuned" if getattr(a, "text_tune_layers", 0) else "frozen MiniLM"
    print(f"\n{BACKBONE}, attention pooling, {text}; {a.steps} steps of {a.batch_size} images, lr {a.lr} "
          f"(top {a.top_lr}), seeds {a.seeds}; dev split (all images), best of the evaluations every {a.eval_every} steps\n")
    print("| row | dev rsum (mean over seeds) | per seed | best steps | vs frozen | training s per step |")
    print("|---|---|---|---|---|---|")
    for row in table:
        values = [r["dev_rsum"] for r in row["runs"]]
        row["mean"], row["vs_frozen"] = round(statistics.mean(values), 2), round(statistics.mean(values) - base, 2)
        per_step = statistics.mean(r["train_seconds"] for r in row["runs"]) / a.steps
        print(f"| {row['row']} | {row['mean']:.1f} | {' / '.join(f'{v:.1f}' for v in values)} | "
              f"{' / '.join(str(r['best_step']) for r in row['runs'])} | {row['vs_frozen']:+.1f} | {per_step:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", help="the split stage's folder (image paths and captions); required to run")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="heads, pooling, temperature")
    ap.add_argument("--top-lr", type=float, default=1e-4, help="the image tower's tuned top (pretrained weights)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--mirror", action="store_true", help="also the row with maps mirrored at random")
    ap.add_argument("--text-tune-layers", type=int, default=0, help="also tune MiniLM's top N layers (0: frozen MiniLM)")
    ap.add_argument("--cache", default="checkpoints/image_top", help="where the frozen bottom's maps are kept")
    ap.add_argument("--out", default="benchmarks/flickr8k/image_top_tuning.json")
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier run's JSON")
    a = ap.parse_args(argv)
    if a.table:
        return print_table(json.loads(Path(a.table).read_text()))
    if not a.splits:
        ap.error("--splits is required (or --table to print an earlier run's table)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlbench.data.manifests import captions_by_row, read_manifest
    from vlbench.models.variants import build_variant, create_variant_model
    from vlbench.runtime import configure_threads, seed_everything
    from vlbench.selection import make_dev_metric
    from vlbench.training import Batches, TextCache, TunedTextCache, lr_at, make_step

    configure_threads()
    device = torch.device("cpu")
    tower = Tower()
    maps = {s: cached_bottom(tower, a.splits, s, Path(a.cache)) for s in ("train", "val")}
    ids = {s: list(read_manifest(a.splits, s)["image_id"]) for s in ("train", "val")}
    captions = captions_by_row(a.splits, "train", ids["train"])
    optim = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "warmup_steps": max(1, a.steps // 20)}
    text = {"text_tuning": "full", "text_tune_layers": a.text_tune_layers} if a.text_tune_layers else {}
    cfg = build_variant("image_top", {**VARIANT, **text, "optim": optim})
    rows_to_run = [("frozen grid (no gradients through the top)", False, False),
                   ("last block + head conv tuned", True, False)]
    if a.mirror:
        rows_to_run.append(("last block + head conv tuned, maps mirrored at random", True, True))
    text_cache, table = None, []
    for label, tune, mirror in rows_to_run:
        per_seed = []
        for seed in a.seeds:
            seed_everything(seed)
            top = tower.fresh_top().requires_grad_(tune)
            train_in = TopTokens(maps["train"], ids["train"], top, mirror, seed)
            model = create_variant_model(cfg, 1280, int(np.prod(maps["train"].shape[2:])), None).to(device)
            if a.text_tune_layers:  # the frozen layers' states are the same for every model: computed once
                if text_cache is None:
                    text_cache = TunedTextCache(model, captions, device)
                text_cache.model = model  # whose tuned layers run on them
            elif text_cache is None:  # frozen MiniLM, mean pooling: the same caption features for every row
                model.eval()
                text_cache = TextCache(model, captions, device)
            dev = make_dev_metric(model, cfg, TopTokens(maps["val"], ids["val"], top, False, seed), a.splits, device, 0)
            heads = [p for p in model.parameters() if p.requires_grad]
            groups = [{"params": heads, "lr": a.lr}] + ([{"params": list(top.parameters()), "lr": a.top_lr}] if tune else [])
            opt = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
            step_fn = make_step(model, cfg, captions, text_cache, train_in, device)
            batches = Batches(len(train_in), captions, a.batch_size, seed)
            curve, best, t0, dev_seconds = [], (-1.0, 0), time.perf_counter(), 0.0
            for step in range(a.steps):
                model.train()
                for g in opt.param_groups:
                    g["lr"] = g.setdefault("peak", g["lr"]) * lr_at(step, cfg.optim) / a.lr  # one schedule, two peaks
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = step_fn(*batches.sample())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
                opt.step()
                if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
                    t_dev = time.perf_counter()
                    value = dev()
                    dev_seconds += time.perf_counter() - t_dev
                    curve.append((step + 1, round(value, 2)))
                    best = max(best, (value, step + 1), key=lambda b: b[0])
            seconds = time.perf_counter() - t0 - dev_seconds  # training steps only
            per_seed.append({"seed": seed, "dev_rsum": round(best[0], 2), "best_step": best[1], "curve": curve,
                             "train_seconds": round(seconds, 1), "dev_seconds": round(dev_seconds, 1)})
            print(f"{label}, seed {seed}: dev rsum {best[0]:.1f} at step {best[1]} ({seconds:.0f} s training)", flush=True)
        table.append({"row": label, "runs": per_seed})
    data = {"args": {k: v for k, v in vars(a).items() if k not in ("out", "cache")}, "rows": table}  # where files went is not a setting
    print_table(data)
    Path(a.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
