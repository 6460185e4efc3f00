"""Wall-clock of the main job: a full `dvc repro` of the default params.yaml in a fresh clone,
then a repeated (no-op) `dvc repro`, side by side in one process.

    python benchmarks/pipeline_repro.py [--keep]

Targets (issue 2): full run under 15 minutes on 2 CPU cores, repeated run under 5 seconds.
Per-stage seconds come from DVC's own output timestamps (the line each stage prints on start).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repro(cwd: Path, env: dict) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro`, return total seconds and (stage, seconds) in run order."""
    dvc = str(Path(sys.executable).parent / "dvc")
    t0 = time.perf_counter()
    proc = subprocess.Popen([dvc, "repro"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages, current, started = [], None, t0
    for line in proc.stdout:
        if line.startswith("Running stage"):
            now = time.perf_counter()
            if current:
                stages.append((current, now - started))
            current, started = line.split("'")[1], now
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed in {cwd}")
    total = time.perf_counter() - t0
    if current:
        stages.append((current, time.perf_counter() - started))
    return total, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlbench-bench-"))
    clone = work / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    full, stages = repro(clone, env)
    noop, _ = repro(clone, env)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("\n| stage | seconds |\n|---|---|")
    for name, s in stages:
        print(f"| {name} | {s:.1f} |")
    print("\n| run | seconds | target |\n|---|---|---|")
    print(f"| full dvc repro | {full:.1f} | < 900 |")
    print(f"| repeated dvc repro (no-op) | {noop:.2f} | < 5 |")
    print(f"\nratio full / no-op: {full / noop:.0f}x")
    print((clone / "metrics" / "summary.md").read_text())
    if not args.keep:
        shutil.rmtree(work)
    else:
        print(f"kept {clone}")


if __name__ == "__main__":
    main()
