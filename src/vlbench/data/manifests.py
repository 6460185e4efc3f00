"""The split stage's manifests, ``<splits>/<split>.parquet``: one row per image with ``image_id``,
``path``, ``captions`` (all of them) and ``split``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

SPLITS = ("train", "val", "test")


def read_manifest(splits_dir: str | Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(splits_dir) / f"{split}.parquet")


def captions_by_row(splits_dir: str | Path, split: str, ids: list[str]) -> list[list[str]]:
    """The captions of images ``ids`` of ``split``, in that order (the rows of their features)."""
    df = read_manifest(splits_dir, split)
    by_id = dict(zip(df["image_id"], df["captions"]))
    return [list(by_id[i]) for i in ids]
