"""Dev-split ablation of the dual encoder's training options on cached features: each option alone
on top of one base, every run the same steps, batch and seed, side by side in one process.

    python benchmarks/alignment_ablation.py --features data/features/efficientnet_lite2 --splits data/splits \
        [--steps 1000] [--batch-size 128] [--dev-images 0] [--seeds 0 1 2] [--only 0 4 5]

Prints a table: option, best dev rsum over the evaluations (every --eval-every steps), its step, and
the difference to the base; with several ``--seeds`` (each seed: the model's initialisation and
its batches), the mean and spread over seeds, so a difference can be read against seed noise. The frozen text encoder's caption features are computed once and shared
(they do not depend on any option here); the model, batches, loss and dev metric are the train
stage's (vlbench.training, vlbench.selection). Text tuning is not here: it cannot share that cache
(see the pipeline's clip_*_top2 variant and alignment_precision.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

BASE = {"model": "dual_encoder", "text_encoder": "minilm_l6", "text_pooling": "mean", "embed_dim": 512, "head": "mlp",
        "image_pooling": "mean", "loss": "infonce"}
OPTIONS = [  # (label, overrides of BASE)
    ("base: InfoNCE, mean image pooling", {}),
    ("multi-positive loss, 2 captions per image", {"loss": "multi_positive", "captions_per_image": 2}),
    ("multi-positive loss, 5 captions per image", {"loss": "multi_positive", "captions_per_image": 5}),
    ("hard-negative weighting (beta 0.5)", {"hard_negative_beta": 0.5}),
    ("VSE++ max-violation (margin 0.2)", {"loss": "vse_max_violation"}),
    ("attention pooling of the grid", {"image_pooling": "attention"}),
    ("GeM pooling of the grid", {"image_pooling": "gem"}),
    ("attention pooling + multi-positive (2)", {"image_pooling": "attention", "loss": "multi_positive", "captions_per_image": 2}),
    ("attention pooling + VSE++", {"image_pooling": "attention", "loss": "vse_max_violation"}),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--dev-images", type=int, default=0, help="0 = the whole dev split")
    ap.add_argument("--only", nargs="*", type=int, help="indices of OPTIONS to run (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to train each option with")
    ap.add_argument("--train-images", type=int, default=0, help="train on the first N training images (0 = all): a quick try")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from vlbench.models.variants import build_variant, create_variant_model
    from vlbench.runtime import configure_threads, seed_everything
    from vlbench.selection import make_dev_metric
    from vlbench.training import Batches, TextCache, lr_at, make_step

    configure_threads()
    device = torch.device("cpu")
    backbone = os.path.basename(os.path.normpath(a.features))
    optim = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "warmup_steps": max(1, a.steps // 20)}
    text_cache, rows = None, []
    for k, (label, over) in enumerate(OPTIONS):
        if a.only and k not in a.only:
            continue
        cfg = build_variant("ablation", {**BASE, **over, "image_encoder": backbone, "optim": optim})
        inputs = open_inputs("train", a.splits, a.features, cfg)
        if a.train_images:
            inputs.ids = inputs.ids[: a.train_images]
        captions = captions_by_row(a.splits, "train", inputs.ids)
        d = inputs.describe()
        per_seed = []
        for seed in a.seeds:
            seed_everything(seed)
            model = create_variant_model(cfg, d["image_dim"], d["n_grid"], None).to(device)
            if text_cache is None:  # frozen MiniLM, mean pooling: the same features for every option
                model.eval()
                text_cache = TextCache(model, captions, device)
            dev = make_dev_metric(model, cfg, open_inputs("val", a.splits, a.features, cfg), a.splits, device, a.dev_images)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
            step_fn = make_step(model, cfg, captions, text_cache, inputs, device)
            batches = Batches(len(inputs), captions, cfg.optim.batch_size, seed, "random", cfg.captions_per_image)
            best, best_step, t0 = -1.0, 0, time.perf_counter()
            for step in range(cfg.optim.steps):
                model.train()
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.optim)
                loss = step_fn(*batches.sample())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if (step + 1) % a.eval_every == 0 or step + 1 == cfg.optim.steps:
                    value = dev()
                    if value > best:
                        best, best_step = value, step + 1
            per_seed.append((best, best_step, time.perf_counter() - t0))
            print(f"{label}, seed {seed}: dev rsum {best:.1f} at step {best_step} ({per_seed[-1][2]:.0f} s)", flush=True)
        rows.append((label, per_seed))
    base = statistics.mean(v for v, _, _ in rows[0][1])
    print(f"\n{backbone} features, {a.steps} steps of {a.batch_size} images, lr {a.lr}, seeds {a.seeds}; dev split "
          f"({'all' if a.dev_images == 0 else a.dev_images} images), best of the evaluations every {a.eval_every} steps\n")
    print("| option | dev rsum (mean over seeds) | spread (max - min) | per seed | best steps | vs first row | train + dev s |")
    print("|---|---|---|---|---|---|---|")
    for label, per_seed in rows:
        values = [v for v, _, _ in per_seed]
        mean = statistics.mean(values)
        print(f"| {label} | {mean:.1f} | {max(values) - min(values):.1f} | {' / '.join(f'{v:.1f}' for v in values)} | "
              f"{' / '.join(str(s) for _, s, _ in per_seed)} | {mean - base:+.1f} | {sum(t for _, _, t in per_seed):.0f} |")


if __name__ == "__main__":
    main()
