"""Stage `download`: fetch or generate the dataset named in params `data`, verify every image.

``data.name: shapes`` draws the embedded dataset. flickr8k, flickr30k and coco are read from
``data.root`` when set (any layout in ``vlbench.data.layouts``), else downloaded once into the
download cache (``--cache``, outside the DVC out) and read from there.

Writes ``<out>/annotations.json`` (image_id, path, captions, split or null), ``<out>/report.json``
(what was checked, skipped or repaired; README "Datasets" explains each key) and, for shapes,
``<out>/images/``. The folder is built under a temporary name and appears only when complete.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .. import io
from ..data.verify import verify_images
from ..params import load_params, section

EXPECTED_CAPTIONS = 5  # Flickr8k, Flickr30k and COCO have at least 5 per image (shapes: exactly 5)


def _draw_shapes(cfg, tmp: Path) -> tuple[list[dict], dict]:
    from ..data import shapes

    s = cfg.shapes
    (tmp / "images").mkdir()
    records = []
    for fname, img, caps in tqdm(
        shapes.generate(s.n_images, s.image_size, s.seed), total=s.n_images, desc="draw shapes", unit="img"
    ):
        img.save(tmp / "images" / fname, quality=92)
        records.append({"image_id": fname, "path": f"images/{fname}", "captions": caps, "split": None})
    return records, {"generated": True, "seed": s.seed}


def run(params_path: str, out: str, cache: str = "data/downloads") -> None:
    raw = load_params(params_path)
    cfg = section(raw, "data")
    root = None
    if cfg.name != "shapes":
        from ..data import fetch

        # Downloads go to the cache first, outside the atomic output folder: they are resumable.
        # Relative paths are the project's (io.project_root), also when a queued DVC experiment
        # runs this stage in a temporary copy of the repository.
        home = io.project_root()
        root = home / cfg.root if cfg.root else fetch.fetch_dataset(cfg.name, home / cache, cfg.urls)
    with io.atomic_dir(out) as tmp:
        if root is None:
            records, report = _draw_shapes(cfg, tmp)
        else:
            from ..data import layouts

            records, report = layouts.read(cfg.name, root)
        records, checked = verify_images(records, tmp, cfg.max_broken_fraction)
        per_image = Counter(len(r["captions"]) for r in records)
        report = {
            "dataset": cfg.name,
            **report,
            "images": len(records),
            "captions": sum(len(r["captions"]) for r in records),
            "captions_per_image": {str(k): per_image[k] for k in sorted(per_image)},
            "images_with_few_captions": sum(v for k, v in per_image.items() if k < EXPECTED_CAPTIONS),
            **checked,
        }
        io.write_json(tmp / "annotations.json", records)
        io.write_json(tmp / "report.json", report)
    print(json.dumps(report))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads section `data`)")
    ap.add_argument("--out", default="data/raw", help="output folder")
    ap.add_argument("--cache", default="data/downloads", help="download cache (archives, checksums.json, unpacked roots)")
    a = ap.parse_args(argv)
    from ..data.fetch import DownloadError

    try:
        run(a.params, a.out, a.cache)
    except DownloadError as e:
        sys.exit(f"vlbench download: {e}")  # one line on stderr, exit status 1
