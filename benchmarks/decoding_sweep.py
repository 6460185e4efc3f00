"""Dev-split experiment: which beam size (with and without trigram blocking, with which
``length_penalty``) should a trained captioner decode with? The evaluate stage scores the
configured decoding beside greedy on the test split; this chooses the configured one on dev, where
choices belong.

    python benchmarks/decoding_sweep.py --model models/grid_transformer \
        --features data/features/efficientnet_lite2 --splits data/splits \
        [--beams 1 3 5 7] [--length-penalties 0 1] [--rerank-neighbours 0 10 --rerank-weights 1 3]
        [--out benchmarks/flickr8k/decoding_sweep.json]

Every decoding runs on every dev image with the variant's own generate (the evaluate stage's
batched decoding, fp32) and is scored by the evaluate stage's code (pycocoevalcap, diversity).
``--rerank-neighbours`` adds consensus re-ranking of the beams (models/consensus.py; 0 = none);
a model trained without it gets its training images' captions from --features and --splits. Prints
a table (CIDEr, BLEU-4, METEOR, mean caption length in words against the references', distinct
captions, % of captions repeating a word trigram, captions per second) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a captioner's trained folder (models/<variant>)")
    ap.add_argument("--features", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--beams", nargs="+", type=int, default=[1, 3, 5, 7], help="beam sizes (1 = greedy)")
    ap.add_argument("--length-penalties", nargs="+", type=float, default=[0.0],
                    help="beam search's decoding.length_penalty values (beam sizes > 1 only)")
    ap.add_argument("--rerank-neighbours", nargs="+", type=int, default=[0],
                    help="decoding.rerank_neighbours values (beam sizes > 1 only; 0 = no re-ranking)")
    ap.add_argument("--rerank-weights", nargs="+", type=float, default=[1.0], help="decoding.rerank_weight values")
    ap.add_argument("--block-trigrams", choices=["both", "on", "off"], default="both",
                    help="decode with trigram blocking, without, or both (default)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/flickr8k/decoding_sweep.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from vlbench.metrics.decodings import decoding_name, score
    from vlbench.models.consensus import NeighbourCaptions
    from vlbench.models.trained import load_trained
    from vlbench.runtime import configure_threads

    configure_threads()
    model, cfg, _ = load_trained(a.model)
    model.eval()
    dev = open_inputs("val", a.splits, a.features, cfg)
    refs = dict(zip(dev.ids, captions_by_row(a.splits, "val", dev.ids)))
    ref_words = statistics.mean(len(c.split()) for caps in refs.values() for c in caps)
    rows = []
    reranks = [(k, w) for k in a.rerank_neighbours for w in (a.rerank_weights if k else [1.0])]
    if any(k for k, _ in reranks) and getattr(model, "neighbours", None) is None:
        train = open_inputs("train", a.splits, a.features, cfg)
        model.neighbours = NeighbourCaptions.from_inputs(train, captions_by_row(a.splits, "train", train.ids))
    choices = [(beam, block, lp, k, w) for beam in a.beams
               for block in {"both": (False, True), "on": (True,), "off": (False,)}[a.block_trigrams]
               for lp in (a.length_penalties if beam > 1 else [0.0]) for k, w in (reranks if beam > 1 else [(0, 1.0)])]
    for beam, block, lp, k, w in choices:
        d = dataclasses.replace(cfg.decoding, strategy="beam" if beam > 1 else "greedy", beam_size=max(beam, 1),
                                block_trigrams=block, length_penalty=lp, rerank_neighbours=k, rerank_weight=w)
        t0, hyps = time.perf_counter(), []
        with torch.no_grad():
            for s in range(0, len(dev), a.batch_size):
                hyps.extend(model.generate(dev.batch(range(s, min(s + a.batch_size, len(dev)))), d))
        seconds = time.perf_counter() - t0
        m = score(refs, dict(zip(dev.ids, hyps)), spice=False)
        row = {"decoding": decoding_name(d), "beam": beam, "block_trigrams": block, "length_penalty": lp,
               "rerank_neighbours": k, "rerank_weight": w,
               **{k: round(m[k], 2) for k in ("CIDEr", "BLEU-4", "METEOR", "distinct_captions", "trigram_repeat")},
               "words": round(statistics.mean(len(h.split()) for h in hyps), 2),
               "captions_per_s": round(len(hyps) / seconds, 1)}
        rows.append(row)
        print(row, flush=True)
    configured = decoding_name(cfg.decoding)
    print(f"\n{a.model}: dev split ({len(dev)} images, references {ref_words:.2f} words on average); "
          f"configured decoding {configured}\n")
    print("| decoding | dev CIDEr | dev BLEU-4 | dev METEOR | words | distinct captions | trigram_repeat % | captions/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (configured)" if r["decoding"] == configured else ""
        print(f"| {r['decoding']}{mark} | {r['CIDEr']:.2f} | {r['BLEU-4']:.2f} | {r['METEOR']:.2f} | {r['words']:.2f} | "
              f"{r['distinct_captions']:.0f} | {r['trigram_repeat']:.1f} | {r['captions_per_s']:.1f} |")
    Path(a.out).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "out"}, "configured": configured,
                                       "reference_words": round(ref_words, 2), "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
