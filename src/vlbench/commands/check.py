"""`vlbench check`: validate the whole params.yaml (every section and variant) and exit."""
from __future__ import annotations

import argparse

from ..params import load_params, variant_names
from ..validation import validate_all


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench check", description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    raw = load_params(a.params)
    validate_all(raw)
    print(f"{a.params}: ok ({len(variant_names(raw))} variants)")
