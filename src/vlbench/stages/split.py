"""Stage `split`: train/val/test manifests (parquet) from the downloaded annotations.

Uses the dataset's own split when it has one (Flickr8k's split files = Karpathy's split),
otherwise a seeded random split with sizes from params `split`. One row per image:
image_id, path, captions (list), split.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import pandas as pd

from .. import io
from ..data.manifests import SPLITS
from ..errors import ParamError
from ..params import load_params, section


def assign_splits(records: list[dict], val_size: int, test_size: int, seed: int) -> list[dict]:
    if all(r.get("split") for r in records):
        return records
    if val_size + test_size >= len(records):
        raise ParamError(
            f"split.test_size: val_size + test_size = {val_size + test_size} leaves no training images out of {len(records)}"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    out = [dict(r) for r in records]
    for rank, i in enumerate(order):
        out[i]["split"] = "test" if rank < test_size else "val" if rank < test_size + val_size else "train"
    return out


def run(params_path: str, raw_dir: str, out: str) -> None:
    cfg = section(load_params(params_path), "split")
    records = json.loads((Path(raw_dir) / "annotations.json").read_text())
    records = assign_splits(records, cfg.val_size, cfg.test_size, cfg.seed)
    counts = {}
    with io.atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = [
                {
                    "image_id": r["image_id"],
                    "path": os.path.join(raw_dir, r["path"]),
                    "captions": list(r["captions"]),
                    "split": split,
                }
                for r in records
                if r["split"] == split
            ]
            if not rows:
                raise ParamError(f"split: the {split} split is empty")
            pd.DataFrame(rows).to_parquet(tmp / f"{split}.parquet", index=False)
            counts[split] = len(rows)
        io.write_json(tmp / "counts.json", counts)
    print(json.dumps(counts))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench split", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads section `split`)")
    ap.add_argument("--raw", default="data/raw", help="folder written by the download stage")
    ap.add_argument("--out", default="data/splits", help="output folder for {train,val,test}.parquet")
    a = ap.parse_args(argv)
    run(a.params, a.raw, a.out)
