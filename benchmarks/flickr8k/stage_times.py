"""Minutes per stage of a finished ``dvc repro`` of the Flickr8k comparison, from the files the stages
wrote: DVC runs the stages one after another, so a stage's minutes are the time from the previous
stage's last output to its own last output (the first stage's from ``--start``, e.g. a
``date +%s`` taken just before ``dvc repro``). Reads modification times only; an output touched
after the run (copied, re-saved) makes its stage look longer.

    python benchmarks/flickr8k/stage_times.py --project <the run's folder> --start <epoch seconds>
"""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path


def last_write(path: Path) -> float:
    """The newest modification time under ``path`` (a file or folder); 0 when it does not exist."""
    if path.is_file():
        return path.stat().st_mtime
    times = [Path(d, f).stat().st_mtime for d, _, files in os.walk(path) for f in files]
    return max(times, default=0.0)


def stage_ends(project: Path) -> dict[str, float]:
    ends = {"check": last_write(project / "data/checked"),
            "download + verify": last_write(project / "data/raw"),
            "split": last_write(project / "data/splits")}
    for feats in sorted((project / "data/features").glob("*")):
        ends[f"features {feats.name}"] = last_write(feats)
    for model in sorted((project / "models").glob("*")):
        ends[f"train {model.name}"] = max(last_write(model),
                                          last_write(project / f"metrics/curves/{model.name}.csv"))
    for metrics in sorted((project / "metrics").glob("*.json")):
        ends[f"evaluate {metrics.stem}"] = metrics.stat().st_mtime
    ends["report"] = last_write(project / "metrics/summary.md")
    return {k: t for k, t in ends.items() if t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="the folder dvc repro ran in")
    ap.add_argument("--start", type=float, required=True, help="when dvc repro started (epoch seconds)")
    args = ap.parse_args()
    previous, total = args.start, 0.0
    print("| ended (UTC) | minutes | stage |\n|---|---|---|")
    for name, end in sorted(stage_ends(args.project).items(), key=lambda kv: kv[1]):
        minutes = (end - previous) / 60
        total += minutes
        print(f"| {datetime.datetime.fromtimestamp(end, datetime.timezone.utc):%H:%M:%S} | {minutes:.2f} | {name} |")
        previous = end
    print(f"| | **{total:.2f}** | whole run |")


if __name__ == "__main__":
    main()
