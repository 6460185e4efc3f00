"""One self-critical (SCST) step of the grid transformer: the train stage's step (samples drawn on
the KV cache without a graph, then scored by one teacher-forced pass with gradients) against the
earlier step that back-propagated through the token-by-token cache, side by side in one process.

    python benchmarks/scst_step.py --model models/grid_transformer \
        --features data/features/efficientnet_lite2 --splits data/splits [--steps 8] [--rounds 3]

Both take the variant's ``scst`` batch size, samples and max_len, under bf16 autocast as
configs/flickr8k.yaml trains, on the same real training images (a trained model, so the captions
have their real lengths). Both run AdamW at lr 0 on their own copy of the model, so every step
starts from the same weights. Timed rounds alternate between the two, so load from other jobs
falls on both alike. Prints seconds per step, the ratio and the largest difference of summed
log-probabilities of the same samples between the two (the same maths, so float noise only).
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import random
import statistics
import time

import torch


def through_the_cache(model, grid, k, max_len, generator):
    """The baseline: sampling with gradients through every cached decoding step."""
    from vlbench.models.sampling import Samples, sample_on_cache

    ids, logprobs, lengths = sample_on_cache(model, model.encode(grid).repeat_interleave(k, 0), max_len, generator)
    return Samples(ids, [model.vocab.decode(r) for r in ids.tolist()], logprobs, lengths)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained grid_transformer folder (models/<variant>)")
    ap.add_argument("--features", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round and way")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from vlbench.metrics.cider_d import CiderD
    from vlbench.models.sampling import sample_grid_transformer
    from vlbench.models.trained import load_trained
    from vlbench.runtime import configure_threads
    from vlbench.scst import ScstTrainer

    configure_threads()
    trained, cfg, _ = load_trained(a.model)
    train = open_inputs("train", a.splits, a.features, cfg)
    refs = captions_by_row(a.splits, "train", train.ids)
    cider = CiderD(refs)
    scfg = cfg.scst
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    ways = {"through the KV cache (before)": through_the_cache, "no-graph sampling + teacher-forced pass": sample_grid_transformer}
    trainers = {}
    for name, sampler in ways.items():
        model = copy.deepcopy(trained)
        for p in model.parameters():
            p.requires_grad_(True)
        model.sample_with_logprobs = functools.partial(sampler, model)  # what ScstTrainer.step calls
        trainers[name] = (model, ScstTrainer(model, cider, scfg.samples, scfg.max_len,
                                             torch.optim.AdamW(model.parameters(), lr=0.0), amp=amp))
    batches = [sorted(random.Random(i).sample(range(len(train)), scfg.batch_size)) for i in range(a.steps)]
    seconds = {n: [] for n in ways}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, (model, trainer) in trainers.items():
            trainer.generator = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            for idx in batches:
                trainer.step(train.batch(idx), [refs[i] for i in idx])
            if r:
                seconds[name].append((time.perf_counter() - t) / len(batches))
    # the same samples scored both ways
    idx = batches[0]
    got = []
    for name, (model, _) in trainers.items():
        model.eval()
        with amp, torch.no_grad():
            got.append(ways[name](model, train.batch(idx), scfg.samples, scfg.max_len, torch.Generator().manual_seed(0)))
    same = got[0].texts == got[1].texts
    diff = (got[0].logprobs.float() - got[1].logprobs.float()).abs().max().item()

    base = statistics.median(seconds[next(iter(ways))])
    print(f"SCST step, grid_transformer, batch {scfg.batch_size} x {scfg.samples} samples, bf16 autocast, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} rounds of {a.steps} steps")
    print(f"{'way':<42} {'s/step':>8} {'speed-up':>9}")
    for name, s in seconds.items():
        m = statistics.median(s)
        print(f"{name:<42} {m:8.3f} {base / m:8.2f}x")
    print(f"same samples from the same seed: {same}; largest |log p| difference: {diff:.2e}")


if __name__ == "__main__":
    main()
