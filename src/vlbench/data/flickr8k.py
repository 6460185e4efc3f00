"""Flickr8k from a local copy in the original release layout.

``Flicker8k_Dataset/*.jpg`` + ``Flickr8k_text/Flickr8k.token.txt`` (``<image>#<k>\\t<caption>``)
and ``Flickr_8k.{train,dev,test}Images.txt`` (the standard split, the same as Karpathy's).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..config import ParamError

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def read_annotations(root: str | Path) -> tuple[list[dict], dict]:
    """Return (records, report). Each record: image_id, path, captions, split."""
    root = Path(root).resolve()
    images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
    token_file = text / "Flickr8k.token.txt"
    if not images.is_dir() or not token_file.is_file():
        raise ParamError(
            f"data.root: {root} is not a Flickr8k folder (expected Flicker8k_Dataset/ and Flickr8k_text/Flickr8k.token.txt)"
        )
    captions: dict[str, list[str]] = defaultdict(list)
    report = {"empty_captions": 0, "bad_lines": 0, "missing_images": 0, "unsplit_images": 0}
    for line in token_file.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            report["bad_lines"] += 1
            continue
        caption = caption.strip()
        if not caption:
            report["empty_captions"] += 1
            continue
        captions[key.split("#")[0]].append(caption)
    split_of = {}
    for split, fname in SPLIT_FILES.items():
        f = text / fname
        if f.is_file():
            for name in f.read_text().split():
                split_of[name] = split
    records = []
    for name in sorted(captions):
        path = images / name
        if not path.is_file():
            report["missing_images"] += 1
            continue
        if name not in split_of:
            report["unsplit_images"] += 1
            continue
        records.append({"image_id": name, "path": str(path), "captions": captions[name], "split": split_of[name]})
    report["images"] = len(records)
    return records, report
