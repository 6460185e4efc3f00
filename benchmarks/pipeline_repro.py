"""Wall-clock of the main job: a full `dvc repro` of the default params.yaml in a fresh clone,
then a repeated (no-op) `dvc repro`, side by side in one process.

    python benchmarks/pipeline_repro.py [--keep]

Targets: full run at most 8 minutes (480 s) on 2 CPU cores, repeated run under 2 seconds.
Per-stage seconds come from DVC's own output timestamps (the line each stage prints on start).
It also measures each stage's start-up (`python -m vlbench.stages.<stage> --help`: interpreter,
imports, argument parsing; best of 3) against a bare `python -c pass` (issue 7); `--startup-only`
measures just that.
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


STAGES = ("download", "split", "features", "train", "evaluate", "report")


def startup_seconds(env: dict, repeats: int = 3) -> list[tuple[str, float]]:
    """Best-of-``repeats`` wall time of each stage's ``--help``, after a bare interpreter start."""
    def best(cmd):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
        return min(times)

    out = [("python -c pass", best([sys.executable, "-c", "pass"]))]
    return out + [(f"stages.{s} --help", best([sys.executable, "-m", f"vlbench.stages.{s}", "--help"])) for s in STAGES]


def print_startup(env: dict) -> None:
    rows = startup_seconds(env)
    bare = rows[0][1]
    print("\n| start-up | seconds | vs bare interpreter |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {s / bare:.0f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    ap.add_argument("--startup-only", action="store_true", help="measure the stages' start-up only")
    args = ap.parse_args()
    if args.startup_only:
        print_startup(dict(os.environ, HF_HUB_OFFLINE="1"))
        return
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
    print(f"| full dvc repro | {full:.1f} | <= 480 |")
    print(f"| repeated dvc repro (no-op) | {noop:.2f} | < 2 |")
    print(f"\nratio full / no-op: {full / noop:.0f}x")
    print_startup(env)
    print((clone / "metrics" / "summary.md").read_text())
    if not args.keep:
        shutil.rmtree(work)
    else:
        print(f"kept {clone}")


if __name__ == "__main__":
    main()
