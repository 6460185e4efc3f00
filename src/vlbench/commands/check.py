"""`vlbench check`: validate the whole params.yaml (every section and variant) and exit.

In the pipeline it is the first stage (`check` in dvc.yaml): a bad key anywhere stops `dvc repro`
before any expensive work, and ``--stamp`` writes a constant file that the download stage depends
on, so a re-check after an edit re-runs nothing else."""
from __future__ import annotations

import argparse

from .. import io
from ..params import load_params, variant_names
from ..validation import validate_all


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench check", description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stamp", default=None, help="after a successful check, write this (constant) file")
    a = ap.parse_args(argv)
    raw = load_params(a.params)
    validate_all(raw)
    if a.stamp:
        io.write_text(a.stamp, "params.yaml checked\n")
    print(f"{a.params}: ok ({len(variant_names(raw))} variants)")
