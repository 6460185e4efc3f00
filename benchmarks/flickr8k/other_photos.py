"""Caption photos that are not from Flickr8k with every trained captioner of a project: a check
that the captioners describe new photos, not the training set's favourite sentences.

    python benchmarks/flickr8k/other_photos.py [--project .] [PHOTO ...]

Without photos it uses three that ship with installed packages (matplotlib's portrait of Grace
Hopper, scikit-learn's China and flower pictures). Prints a markdown table: photo x captioner,
with each captioner's configured decoding and greedy decoding.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import yaml


def packaged_photos() -> list[Path]:
    import matplotlib
    import sklearn

    return [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
            Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
            Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", nargs="*", type=Path)
    ap.add_argument("--project", type=Path, default=Path("."), help="the project whose models/ to use")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlbench.inference import Captioner
    from vlbench.runtime import configure_threads

    configure_threads()
    photos = a.photos or packaged_photos()
    params = yaml.safe_load((a.project / "params.yaml").read_text())
    rows = []
    for name in params.get("variants") or {}:
        folder = a.project / "models" / name
        if not (folder / "config.json").is_file():
            continue
        cap = Captioner.from_run(folder)
        if cap.cfg.family != "captioning":
            continue
        configured = cap.caption([str(p) for p in photos])
        greedy = cap.caption([str(p) for p in photos], replace(cap.cfg.decoding, strategy="greedy"))
        rows += [(p.name, name, c, g) for p, c, g in zip(photos, configured, greedy)]
    print("| photo | captioner | configured decoding | greedy |\n|---|---|---|---|")
    for row in sorted(rows):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
