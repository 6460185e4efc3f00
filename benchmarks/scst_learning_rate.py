"""Dev-split experiment: more self-critical training (SCST) of a trained captioner, at several
learning rates: does dev CIDEr keep rising past the configured SCST phase?

    python benchmarks/scst_learning_rate.py --model models/grid_transformer \
        --features data/features/efficientnet_lite2 --splits data/splits \
        [--lrs 5e-5 2e-4] [--steps 200] [--eval-every 100] [--warmup 0] [--batch-size 16] [--mark-end]
        [--candidates sample|beam]
        [--out benchmarks/flickr8k/scst_learning_rate.json]

Each learning rate continues from the same trained model (a fresh copy each time) with the train
stage's SCST step (vlbench.scst.ScstTrainer: CIDEr-D rewards against the training references,
mean-of-others baseline, autocast of the variant's ``optim.precision``, ``auto`` when unset) on the same image batches and
sampling seed. Dev CIDEr, BLEU-4 and METEOR (pycocoevalcap) are those of the variant's own decoding
on every dev image, before SCST and every ``--eval-every`` steps, next to the mean SCST reward of
those steps (CIDEr-D x100 of the samples, on training images) and the share of dev captions cut off
mid-phrase (ending in "a", "the", "of", ...; the first four dev captions are printed too).
``--bleu-weight`` adds that many times each candidate's sentence BLEU-4 to its reward
(``scst.bleu_weight``). ``--warmup`` and ``--batch-size`` override the variant's ``scst.warmup_steps`` and ``scst.batch_size``;
``--candidates`` overrides the variant's ``scst.candidates`` (sampled captions, or the beams of a
beam search); ``--mark-end`` rewards with CIDEr-D that counts an end token in its n-grams
(``CiderD(mark_end=True)``).
Prints a table and writes it as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a captioner's trained folder (models/<variant>)")
    ap.add_argument("--features", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 2e-4])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=None, help="images per SCST step (default: the variant's scst.batch_size)")
    ap.add_argument("--mark-end", action="store_true", help="the reward's CIDEr-D counts an end token in its n-grams")
    ap.add_argument("--bleu-weight", type=float, default=None,
                    help="reward = CIDEr-D + this x sentence BLEU-4 (default: the variant's scst.bleu_weight)")
    ap.add_argument("--warmup", type=int, default=None, help="SCST warm-up steps (default: the variant's scst.warmup_steps)")
    ap.add_argument("--candidates", choices=["sample", "beam"], default=None,
                    help="SCST candidates per image (default: the variant's scst.candidates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/flickr8k/scst_learning_rate.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from flickr8k.cut_off import share_cut_off  # benchmarks/flickr8k: captions that stop mid-phrase
    from vlbench.metrics.cider_d import CiderD
    from vlbench.metrics.decodings import score
    from vlbench.models.trained import load_trained
    from vlbench.runtime import configure_threads
    from vlbench.scst import ScstTrainer, scst_lr
    from vlbench.training import amp_dtype

    configure_threads()
    _, cfg, _ = load_trained(a.model)
    train = open_inputs("train", a.splits, a.features, cfg)
    dev = open_inputs("val", a.splits, a.features, cfg)
    train_refs = captions_by_row(a.splits, "train", train.ids)
    dev_refs = dict(zip(dev.ids, captions_by_row(a.splits, "val", dev.ids)))
    cider = CiderD(train_refs, mark_end=a.mark_end)  # document frequencies of the training references only
    scfg = cfg.scst
    if a.bleu_weight is not None:
        scfg = dataclasses.replace(scfg, bleu_weight=a.bleu_weight)
    if a.warmup is not None:
        scfg = dataclasses.replace(scfg, warmup_steps=a.warmup)
    if a.batch_size is not None:
        scfg = dataclasses.replace(scfg, batch_size=a.batch_size)
    if a.candidates is not None:
        scfg = dataclasses.replace(scfg, candidates=a.candidates)

    def dev_scores(model) -> dict:
        model.eval()
        hyps = []
        with torch.no_grad():
            for s in range(0, len(dev), 64):
                hyps.extend(model.generate(dev.batch(range(s, min(s + 64, len(dev)))), cfg.decoding))
        m = score(dev_refs, dict(zip(dev.ids, hyps)), spice=False)
        print("  " + "\n  ".join(hyps[:4]), flush=True)
        return {**{k: round(m[k], 2) for k in ("CIDEr", "BLEU-4", "METEOR")}, "cut_off": round(share_cut_off(hyps), 1)}

    dtype = amp_dtype(cfg.optim.precision or "auto", torch.device("cpu"))  # emulated bf16 is many times slower
    amp = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    rows, start = [], None
    for lr in a.lrs:
        model = load_trained(a.model)[0]
        if start is None:
            start = dev_scores(model)
            print(f"start: dev {start}", flush=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay)
        trainer = ScstTrainer(model, cider, scfg.samples, scfg.max_len, opt, torch.Generator().manual_seed(a.seed + 1),
                              amp, candidates=scfg.candidates, bleu_weight=scfg.bleu_weight)
        rng, rewards, curve, t0 = random.Random(a.seed), [], [], time.perf_counter()
        for s in range(a.steps):
            idx = sorted(rng.sample(range(len(train)), scfg.batch_size))
            for group in opt.param_groups:
                group["lr"] = scst_lr(s, dataclasses.replace(scfg, lr=lr))
            rewards.append(trainer.step(train.batch(idx), [train_refs[i] for i in idx])["reward"])
            if (s + 1) % a.eval_every == 0 or s + 1 == a.steps:
                point = {"step": s + 1, **dev_scores(model), "reward": round(100 * float(np.mean(rewards[-a.eval_every:])), 2)}
                curve.append(point)
                print(f"lr {lr:g}: {point} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append({"lr": lr, "warmup_steps": scfg.warmup_steps, "curve": curve, "seconds": round(time.perf_counter() - t0, 1)})
    print(f"\n{a.model}: SCST {a.steps} steps of {scfg.batch_size} images x {scfg.samples} "
          f"{'beams' if scfg.candidates == 'beam' else 'samples'} from the trained "
          f"model; dev split ({len(dev)} images), decoding {cfg.decoding.strategy} {cfg.decoding.beam_size}"
          f"{', trigrams blocked' if cfg.decoding.block_trigrams else ''}\n")
    print(f"{scfg.batch_size} images a step; learning rate reached linearly over the first {scfg.warmup_steps} SCST "
          f"steps; reward CIDEr-D{' with an end token' if a.mark_end else ''}\n")
    print("| lr | step | dev CIDEr | vs start | dev BLEU-4 | dev METEOR | cut off % | SCST reward (train) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| - | 0 | {start['CIDEr']:.2f} | +0.00 | {start['BLEU-4']:.2f} | {start['METEOR']:.2f} | {start['cut_off']:.1f} | |")
    for row in rows:
        for p in row["curve"]:
            print(f"| {row['lr']:g} | {p['step']} | {p['CIDEr']:.2f} | {p['CIDEr'] - start['CIDEr']:+.2f} | "
                  f"{p['BLEU-4']:.2f} | {p['METEOR']:.2f} | {p['cut_off']:.1f} | {p['reward']:.2f} |")
    Path(a.out).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "out"}, "start": start, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
