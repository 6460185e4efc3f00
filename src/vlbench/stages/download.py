"""Stage `download`: fetch or generate the dataset named in params `data`, verify every image.

Writes ``<out>/annotations.json`` (image_id, path, captions, optional split), ``<out>/report.json``
(what was checked, skipped or repaired) and, for the generated default, ``<out>/images/``.
The folder is built under a temporary name and appears only when complete.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .. import io
from ..config import ParamError, load_params, section, validate_all


def verify_images(records: list[dict], base: Path, max_broken_fraction: float = 0.05) -> tuple[list[dict], int]:
    """Drop records whose image does not decode; fail when too many are broken."""
    good, broken = [], 0
    for r in tqdm(records, desc="verify images", unit="img"):
        try:
            with Image.open(base / r["path"]) as im:
                im.load()
            good.append(r)
        except Exception:
            broken += 1
    if records and broken / len(records) > max_broken_fraction:
        raise RuntimeError(f"{broken}/{len(records)} images are broken (more than {max_broken_fraction:.0%})")
    return good, broken


def run(params_path: str, out: str) -> None:
    raw = load_params(params_path)
    validate_all(raw)  # the first stage checks everything, before any expensive work
    cfg = section(raw, "data")
    with io.atomic_dir(out) as tmp:
        if cfg.name == "shapes":
            from ..data import shapes

            s = cfg.shapes
            (tmp / "images").mkdir()
            records = []
            for fname, img, caps in tqdm(
                shapes.generate(s.n_images, s.image_size, s.seed), total=s.n_images, desc="draw shapes", unit="img"
            ):
                img.save(tmp / "images" / fname, quality=92)
                records.append({"image_id": fname, "path": f"images/{fname}", "captions": caps, "split": None})
            report = {"images": len(records), "generated": True, "seed": s.seed}
        elif cfg.name == "flickr8k":
            from ..data import flickr8k

            records, report = flickr8k.read_annotations(cfg.root)
        else:  # pragma: no cover - the config Literal rejects it first
            raise ParamError(f"data.name: {cfg.name!r} has no downloader")
        records, broken = verify_images(records, tmp)
        report["broken_images"] = broken
        report["images"] = len(records)
        report["captions"] = sum(len(r["captions"]) for r in records)
        io.write_json(tmp / "annotations.json", records)
        io.write_json(tmp / "report.json", {"dataset": cfg.name, **report})
    print(json.dumps({"dataset": cfg.name, **report}))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads section `data`)")
    ap.add_argument("--out", default="data/raw", help="output folder")
    a = ap.parse_args(argv)
    run(a.params, a.out)
