"""How many of a project's test captions stop mid-phrase: the share whose last word is an article,
preposition, conjunction or possessive ("a man is sitting on a ."), per captioner and decoding,
next to the human references' share. Reads the evaluate stage's ``metrics/<variant>_captions.json``.

    python benchmarks/flickr8k/cut_off.py [--project .]

Before commit 07464bd the grid transformer could generate <unk>, which its vocabulary's decode
drops, so "on a <unk>" printed as "on a ."; this counts such captions in any run's files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlbench.metrics.cider_d import tokenize

CUT_OFF = {"a", "an", "the", "of", "on", "in", "with", "and", "at", "to", "its", "his", "her", "their"}


def share_cut_off(captions: list[str]) -> float:
    """% of ``captions`` whose last word (punctuation dropped) is in CUT_OFF."""
    return 100.0 * sum(bool(set(tokenize(c)[-1:]) & CUT_OFF) for c in captions) / max(1, len(captions))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".")
    a = ap.parse_args(argv)
    files = sorted(Path(a.project, "metrics").glob("*_captions.json"))
    if not files:
        raise SystemExit(f"no metrics/*_captions.json under {a.project}: run the evaluate stage first")
    print("| variant | decoding | captions | cut off % |")
    print("|---|---|---|---|")
    references = None
    for f in files:
        rows = json.loads(f.read_text())
        variant = f.name.removesuffix("_captions.json")
        for decoding in rows[0].get("decodings", {}):
            caps = [r["decodings"][decoding] for r in rows]
            print(f"| {variant} | {decoding} | {len(caps)} | {share_cut_off(caps):.1f} |")
        references = [ref for r in rows for ref in r["references"]]
    print(f"| *human references* | - | {len(references)} | {share_cut_off(references):.1f} |")


if __name__ == "__main__":
    main()
