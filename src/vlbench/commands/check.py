"""`vlbench check`: validate the whole params.yaml (every section and variant) and exit.

In the pipeline it is the first stage (`check` in dvc.yaml): a bad key anywhere stops `dvc repro`
before any expensive work, and ``--stamp`` writes a constant file that the download stage depends
on, so a re-check after an edit re-runs nothing else. It also warns (without failing) when variants would
train under emulated bf16 on this machine: the train stage would take many times longer than in fp32."""
from __future__ import annotations

import argparse
import sys

from .. import io
from ..params import load_params, section, variant_names
from ..validation import validate_all


def emulated_bf16(raw: dict, device) -> list[str]:
    """The variants whose precision (``optim.precision``, else ``train.precision``) is an explicit bf16
    that ``device`` (the train stage's) would emulate (no AVX512-BF16/AMX, or a GPU without bf16)."""
    from ..models.variants import build_variant
    from ..training import native_bf16, variant_precision

    tcfg = section(raw, "train")
    if native_bf16(device):
        return []
    groups = {"variants": raw.get("variants") or {}, "pixel_variants": raw.get("pixel_variants") or {}}
    return [name for group, variants in groups.items() for name, params in variants.items()
            if variant_precision(build_variant(name, params, group), tcfg) == "bf16"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench check", description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stamp", default=None, help="after a successful check, write this (constant) file")
    a = ap.parse_args(argv)
    raw = load_params(a.params)
    validate_all(raw)
    from ..runtime import pick_device

    device = pick_device(section(raw, "train").device)
    slow = emulated_bf16(raw, device)
    if slow:
        from ..training import no_bf16_reason

        print(f"vlbench check: warning: precision bf16, but {no_bf16_reason(device)}: "
              f"{', '.join(slow)} would train many times slower than in fp32; set train.precision (or the variant's "
              f"optim.precision) to auto (bf16 only where it is native) or fp32", file=sys.stderr)
    if a.stamp:
        io.write_text(a.stamp, "params.yaml checked\n")
    print(f"{a.params}: ok ({len(variant_names(raw))} variants)")
