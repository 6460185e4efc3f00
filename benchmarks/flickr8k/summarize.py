"""Collect the Flickr8k comparison's test-split numbers into one file, benchmarks/flickr8k/summary.json:
``{variant: {metric: value}}`` with the names the evaluate stage writes (``i2t_R@1``, ``rsum``, ``BLEU-4``,
``CIDEr``, ``trigram_repeat``, ...), the baselines ``random_projections``, ``nearest_neighbour`` and
``chance``, and the ``commit`` the run came from.

    cp configs/flickr8k.yaml params.yaml && dvc exp run -n flickr8k
    python benchmarks/flickr8k/summarize.py [--metrics metrics] [--out benchmarks/flickr8k/summary.json]

It reads only files the pipeline wrote (metrics/<variant>.json); it refuses to write when a variant of
params.yaml has no metrics yet or params.yaml is not the committed Flickr8k configuration (its
``tracking`` and ``transfer`` sections aside: they do not change the numbers).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


# sections that do not change the test numbers: where runs are logged, other datasets to score on
NOT_DECIDING = ("tracking", "transfer")


def deciding(params: dict) -> dict:
    """The params that decide the comparison's numbers."""
    return {k: v for k, v in params.items() if k not in NOT_DECIDING}


def summarize(params: dict, metrics_dir: Path, commit: str) -> dict:
    names = list(params.get("variants") or {}) + list(params.get("pixel_variants") or {})
    missing = [n for n in names if not (metrics_dir / f"{n}.json").exists()]
    if missing:
        raise SystemExit(f"no test metrics yet for {', '.join(missing)} in {metrics_dir}: run the pipeline first")
    results = [json.loads((metrics_dir / f"{n}.json").read_text()) for n in names]
    out: dict = {}
    for r in results:
        out[r["variant"]] = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}
    align = [r for r in results if r["family"] == "alignment"]
    caps = [r for r in results if r["family"] == "captioning"]
    chance: dict = {}
    if align:  # the baselines of the first alignment variant (its image encoder's features)
        out["random_projections"] = align[0]["random_projection"]
        chance.update(align[0]["chance"])
    if caps:
        out["nearest_neighbour"] = caps[0]["nearest_neighbour"]
        chance.update(caps[0]["chance"])
    out["chance"] = chance
    out["test_images"] = results[0]["images"]
    out["commit"] = commit
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="the project the run was made in")
    ap.add_argument("--metrics", type=Path, default=None, help="default: <project>/metrics")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flickr8k.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "flickr8k" / "summary.json")
    a = ap.parse_args(argv)
    params = yaml.safe_load((a.project / "params.yaml").read_text())
    config = yaml.safe_load(a.config.read_text())
    if deciding(params) != deciding(config):
        raise SystemExit(f"{a.project / 'params.yaml'} is not {a.config}: these numbers would not be the committed comparison")
    summary = summarize(params, a.metrics or a.project / "metrics", _git("rev-parse", "HEAD", cwd=a.project))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1) + "\n")
    n = len(params.get("variants") or {}) + len(params.get("pixel_variants") or {})
    print(f"wrote {a.out} ({n} variants, commit {summary['commit'][:12]})", file=sys.stderr)


if __name__ == "__main__":
    main()
