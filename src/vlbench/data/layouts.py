"""Read a local copy of Flickr8k, Flickr30k or COCO in any layout they are commonly shipped in.

``read(name, root)`` detects the layout and returns ``(records, report)``: one record per image
that has captions (image_id, absolute path, captions, split or None) and the counts of what was
skipped in the annotations (the download stage then checks the image files themselves).

Split: Karpathy's ``dataset_<name>.json`` when it is in the root (or one folder down), else
Flickr8k's own split files (the same split), else None and the split stage draws a seeded one.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ParamError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Counters every report holds (0 when nothing happened), so readers of report.json can rely on them.
ANNOTATION_KEYS = (
    "bad_lines", "non_utf8_lines", "empty_captions", "duplicate_captions", "duplicate_image_ids",
    "captions_for_unknown_images", "images_without_captions", "unsplit_images",
)


@dataclass
class Captions:
    """Captions per image as a layout's files list them, with the counts of what was skipped."""

    by_image: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    paths: dict[str, Path] = field(default_factory=dict)
    split_keys: dict[str, str] = field(default_factory=dict)  # image -> its key in Karpathy's json
    own_split: dict[str, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    _seen: set = field(default_factory=set)

    def add(self, image: str, path: Path, caption: str, number: str | int | None = None) -> None:
        """One caption line; ``number`` (its index, when the format has one) finds repeats."""
        caption = caption.strip()
        if not caption:
            self.counts["empty_captions"] += 1
            return
        key = (image, caption if number is None else number)
        if key in self._seen:
            self.counts["duplicate_captions"] += 1
            return
        self._seen.add(key)
        self.by_image[image].append(caption)
        self.paths[image] = path


def _lines(path: Path, counts: Counter) -> Iterator[str]:
    """Non-blank lines of a text file; a line that is not UTF-8 is skipped and counted."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # BOM from Windows editors
        data = data[3:]
    for raw in data.splitlines():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts["non_utf8_lines"] += 1
            continue
        if line.strip():
            yield line


def _folder(root: Path, *names: str) -> Path | None:
    """The first existing folder of ``names``; archives often wrap it in one of the same name."""
    for n in names:
        d = root / n
        if d.is_dir():
            return d / n if (d / n).is_dir() else d
    return None


def _file(dirs: list[Path], *names: str) -> Path | None:
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ParamError(f"data.root: {path} is not valid JSON ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- caption file formats


def _token_file(images: Path, token: Path) -> Captions:
    """Flickr ``<image>#<k>\\t<caption>`` lines (Flickr8k.token.txt, results_20130124.token)."""
    c = Captions()
    for line in _lines(token, c.counts):
        key, sep, caption = line.partition("\t")
        name, hash_, number = key.strip().rpartition("#")
        if not sep or not hash_ or not name:
            c.counts["bad_lines"] += 1
            continue
        c.add(name, images / name, caption, number)
    return c


def _flickr30k_csv(images: Path, table: Path) -> Captions:
    """Flickr30k ``results.csv``: ``image_name| comment_number| comment`` with a header line."""
    c = Captions()
    for i, line in enumerate(_lines(table, c.counts)):
        if i == 0 and line.replace(" ", "").lower().startswith("image_name|"):
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
            c.counts["bad_lines"] += 1
            continue
        c.add(parts[0], images / parts[0], parts[2], parts[1])
    return c


def _kaggle(images: Path, table: Path) -> Captions:
    """Kaggle ``captions.txt``: header ``image,caption``; captions may hold unquoted commas."""
    c = Captions()
    for i, row in enumerate(csv.reader(_lines(table, c.counts))):
        if i == 0 and [x.strip().lower() for x in row[:2]] == ["image", "caption"]:
            continue
        if len(row) < 2 or not row[0].strip():
            c.counts["bad_lines"] += 1
            continue
        name = row[0].strip()
        c.add(name, images / name, ",".join(row[1:]))
    return c


def _karpathy_captions(images: Path, karpathy: Path) -> Captions:
    """Captions from Karpathy's ``dataset_<name>.json`` itself (``sentences[].raw``)."""
    c = Captions()
    for im in _json(karpathy).get("images", []):
        name = im.get("filename")
        if not name:
            c.counts["bad_lines"] += 1
            continue
        if name in c.paths:
            c.counts["duplicate_image_ids"] += 1
            continue
        for k, s in enumerate(im.get("sentences", [])):
            c.add(name, images / name, s.get("raw", ""), k)
    return c


def _coco(root: Path) -> tuple[Captions, str] | None:
    """``train<year>/ val<year>/`` + ``annotations/captions_<split><year>.json``, 2014 or 2017."""
    for year in ("2014", "2017"):
        pairs = [(root / f"{s}{year}", root / "annotations" / f"captions_{s}{year}.json") for s in ("train", "val")]
        pairs = [(folder, ann) for folder, ann in pairs if folder.is_dir() and ann.is_file()]
        if pairs:
            break
    else:
        return None
    c, seen_ids = Captions(), set()
    for folder, ann in pairs:
        data = _json(ann)
        name_of = {}
        for im in data.get("images", []):
            if im["id"] in seen_ids:
                c.counts["duplicate_image_ids"] += 1
                continue
            seen_ids.add(im["id"])
            name_of[im["id"]] = im["file_name"]
        for a in data.get("annotations", []):
            name = name_of.get(a.get("image_id"))
            if name is None:
                c.counts["captions_for_unknown_images"] += 1
                continue
            c.add(name, folder / name, a.get("caption") or "", a.get("id"))
        # Karpathy's json names COCO images by id: the 2017 file names differ from 2014's.
        c.split_keys.update({name: image_id for image_id, name in name_of.items()})
    return c, f"coco{year}"


# ---------------------------------------------------------------- layouts per dataset


def _karpathy_file(root: Path, name: str) -> Path | None:
    fname = f"dataset_{name}.json"
    if (root / fname).is_file():
        return root / fname
    return next(iter(sorted(root.glob(f"*/{fname}"))), None)


def _flickr8k_original(root: Path, name: str):
    images = _folder(root, "Flicker8k_Dataset", "Flickr8k_Dataset")
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    if not images or not token.is_file():
        return None
    c = _token_file(images, token)
    for split, fname in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        f = root / "Flickr8k_text" / f"Flickr_8k.{fname}.txt"
        for image in f.read_text(errors="replace").split() if f.is_file() else []:
            if image in c.own_split:
                c.counts["duplicate_image_ids"] += 1  # listed in two splits: the first one wins
                continue
            c.own_split[image] = split
    return c, "flickr8k"


FLICKR30K_IMAGES = ("flickr30k_images", "flickr30k-images")


def _flickr30k_token(root: Path, name: str):
    images = _folder(root, *FLICKR30K_IMAGES)
    token = images and _file([root, images.parent, root / "results_20130124"], "results_20130124.token")
    return (_token_file(images, token), "flickr30k_token") if token else None


def _flickr30k_csv_layout(root: Path, name: str):
    images = _folder(root, *FLICKR30K_IMAGES)
    table = images and _file([root, images.parent, images], "results.csv")
    return (_flickr30k_csv(images, table), "flickr30k_csv") if table else None


def _kaggle_layout(root: Path, name: str):
    images = _folder(root, "Images", "images")
    table = _file([root], "captions.txt")
    return (_kaggle(images, table), "kaggle") if images and table else None


def _karpathy_layout(images_dirs: tuple[str, ...]):
    def detect(root: Path, name: str):
        images, karpathy = _folder(root, *images_dirs), _karpathy_file(root, name)
        return (_karpathy_captions(images, karpathy), "karpathy_json") if images and karpathy else None

    return detect


def _coco_layout(root: Path, name: str):
    return _coco(root)


Detector = Callable[[Path, str], "tuple[Captions, str] | None"]
LAYOUTS: dict[str, list[tuple[str, Detector]]] = {
    "flickr8k": [
        ("Flicker8k_Dataset/ + Flickr8k_text/Flickr8k.token.txt (original release)", _flickr8k_original),
        ("Images/ + captions.txt (Kaggle)", _kaggle_layout),
        ("Flicker8k_Dataset/ + dataset_flickr8k.json (Karpathy)", _karpathy_layout(("Flicker8k_Dataset", "Flickr8k_Dataset"))),
    ],
    "flickr30k": [
        ("flickr30k_images/ + results_20130124.token (original release)", _flickr30k_token),
        ("flickr30k_images/ + results.csv (image_name| comment_number| comment)", _flickr30k_csv_layout),
        ("Images/ + captions.txt (Kaggle)", _kaggle_layout),
        ("flickr30k-images/ + dataset_flickr30k.json (Karpathy)", _karpathy_layout(FLICKR30K_IMAGES)),
    ],
    "coco": [
        ("train2014/ val2014/ or train2017/ val2017/ + annotations/captions_<split><year>.json", _coco_layout),
        ("Images/ + captions.txt (Kaggle)", _kaggle_layout),
    ],
}


def _karpathy_split(path: Path, by_cocoid: bool) -> dict:
    """{file name (or COCO id): split}; Karpathy's 'restval' images are training images."""
    out = {}
    for im in _json(path).get("images", []):
        key = im.get("cocoid") if by_cocoid else im.get("filename")
        split = im.get("split")
        out[key] = "train" if split == "restval" else split
    return out


def _images_in(folders: set[Path]) -> set[Path]:
    return {
        Path(e.path)
        for folder in folders
        for e in os.scandir(folder)
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
    }


def read(name: str, root: str | Path) -> tuple[list[dict], dict]:
    """Detect the layout of ``root`` and return (records, report) for dataset ``name``."""
    root = Path(root).resolve()
    for _, detect in LAYOUTS[name]:
        found = detect(root, name)
        if found:
            break
    else:
        expected = "; or ".join(desc for desc, _ in LAYOUTS[name])
        raise ParamError(f"data.root: {root} is not a {name} copy in a known layout; expected {expected}")
    c, layout = found
    split_of, split_source = None, "seeded"
    karpathy = _karpathy_file(root, name)
    if karpathy:
        split_of, split_source = _karpathy_split(karpathy, by_cocoid=bool(c.split_keys)), "karpathy"
    elif c.own_split:
        split_of, split_source = c.own_split, "flickr8k_split_files"

    records = []
    for image in sorted(c.by_image):
        split = None
        if split_of is not None:
            split = split_of.get(c.split_keys.get(image, image))
            if split is None:
                c.counts["unsplit_images"] += 1
                continue
        records.append({"image_id": image, "path": str(c.paths[image]), "captions": c.by_image[image], "split": split})
    listed = set(c.paths.values())
    c.counts["images_without_captions"] = len(_images_in({p.parent for p in listed if p.parent.is_dir()}) - listed)
    report = {
        "layout": layout,
        "root": str(root),
        "split_source": split_source,
        **{k: c.counts[k] for k in ANNOTATION_KEYS},
    }
    return records, report
