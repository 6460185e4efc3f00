"""`vlbench caption IMG [IMG ...] --variant NAME`: print one caption per image.

Decoding defaults to the variant's params; override with --beam N, or --top-p/--temperature for
nucleus sampling. A missing or unreadable file gets an error line; the other images still get
their captions (exit status 1 if any file failed).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench caption", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--variant", help="a trained captioning variant (reads models/<variant>)")
    ap.add_argument("--model", help="a trained model folder, or an MLflow model URI (models:/<variant>@champion, runs:/<id>/model), instead of --variant")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--beam", type=int, help="beam search with this width")
    g.add_argument("--top-p", type=float, help="nucleus sampling: keep this probability mass")
    ap.add_argument("--temperature", type=float, help="nucleus sampling temperature")
    ap.add_argument("--max-len", type=int, help="maximum caption length in tokens")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    a = ap.parse_args(argv)
    if not (a.variant or a.model):
        ap.error("give --variant or --model")
    from ..inference import Captioner
    from ..runtime import configure_threads

    configure_threads()  # VLBENCH_JOBS: jobs sharing the cores
    cap = Captioner.from_run(a.model, a.variant)
    if cap.cfg.family != "captioning":
        ap.error(f"{a.variant or a.model} is a {cap.cfg.family} variant, not a captioner")
    decoding = cap.decoding(a.beam, a.top_p, a.temperature, a.max_len)
    failed = 0
    for path, out in zip(a.images, cap.caption_each(a.images, decoding, a.seed)):
        if isinstance(out, Exception):
            failed += 1
            print(f"error: {out}", file=sys.stderr)
        else:
            print(f"{path}\t{out}")
    if failed:
        raise SystemExit(1)
