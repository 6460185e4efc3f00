"""Collect the Flickr8k comparison's test-split numbers into one file, benchmarks/flickr8k/summary.json:
``{variant: {metric: value}}`` with the names the evaluate stage writes (``i2t_R@1``, ``rsum``, ``BLEU-4``,
``CIDEr``, ``trigram_repeat``, ...), the baselines ``random_projections``, ``nearest_neighbour`` and
``chance``, and the ``commit`` the run came from.

    cp configs/flickr8k.yaml params.yaml && dvc exp run -n flickr8k
    python benchmarks/flickr8k/summarize.py [--metrics metrics] [--out benchmarks/flickr8k/summary.json]

It reads only files the pipeline wrote (metrics/<variant>.json); it refuses to write when a variant of
params.yaml has no metrics yet or params.yaml is not the committed Flickr8k configuration (its
``tracking`` and ``transfer`` sections aside: they do not change the numbers).

A re-run of some variants only (``dvc repro evaluate@grid_transformer`` after changing its params):

    python benchmarks/flickr8k/summarize.py --rerun grid_transformer

replaces those variants' rows of the existing summary and records the re-run's commit under
``reruns``. It refuses when anything else that decides the numbers changed since the summary's
commit: the other variants' params or the shared sections (configs/flickr8k.yaml then and now), or
the re-run's test images and nearest-neighbour baseline. Code changes since that commit are not
checked: a change that touches the other variants calls for the whole run.
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


def row(result: dict) -> dict:
    """A metrics file's numeric test metrics: its row of the summary."""
    return {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}


def summarize(params: dict, metrics_dir: Path, commit: str) -> dict:
    names = list(params.get("variants") or {}) + list(params.get("pixel_variants") or {})
    missing = [n for n in names if not (metrics_dir / f"{n}.json").exists()]
    if missing:
        raise SystemExit(f"no test metrics yet for {', '.join(missing)} in {metrics_dir}: run the pipeline first")
    results = [json.loads((metrics_dir / f"{n}.json").read_text()) for n in names]
    out: dict = {}
    for r in results:
        out[r["variant"]] = row(r)
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


def without(params: dict, names: list[str]) -> dict:
    """The deciding params with the variants ``names`` left out."""
    out = deciding(params)
    for group in ("variants", "pixel_variants"):
        if out.get(group):
            out[group] = {k: v for k, v in out[group].items() if k not in names}
    return out


def rerun(base: dict, params: dict, base_params: dict, metrics_dir: Path, names: list[str], commit: str) -> dict:
    """``base`` (a summary) with the rows of ``names`` from ``metrics_dir``; ``base_params``: the
    configuration at the base summary's commit."""
    unknown = [n for n in names if n not in base]
    if unknown:
        raise SystemExit(f"--rerun {', '.join(unknown)}: not a variant of the existing summary")
    if without(params, names) != without(base_params, names):
        raise SystemExit(f"params other than those of {', '.join(names)} changed since commit {base['commit'][:12]}: "
                         "the other rows would not be this configuration's; run the whole comparison")
    out = dict(base)
    for n in names:
        path = metrics_dir / f"{n}.json"
        if not path.exists():
            raise SystemExit(f"no test metrics yet for {n} in {metrics_dir}: run the pipeline first")
        r = json.loads(path.read_text())
        if r["images"] != base["test_images"] or (r["family"] == "captioning"
                                                    and r["nearest_neighbour"] != base["nearest_neighbour"]):
            raise SystemExit(f"{path}: its test images or nearest-neighbour baseline differ from the summary's: "
                             "other data or features; run the whole comparison")
        out[n] = row(r)
    out["reruns"] = {**base.get("reruns", {}), **{n: commit for n in names}}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="the project the run was made in")
    ap.add_argument("--metrics", type=Path, default=None, help="default: <project>/metrics")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flickr8k.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "flickr8k" / "summary.json")
    ap.add_argument("--rerun", nargs="+", metavar="VARIANT", default=None,
                    help="replace only these variants' rows of the existing --out summary (see above)")
    a = ap.parse_args(argv)
    params = yaml.safe_load((a.project / "params.yaml").read_text())
    config = yaml.safe_load(a.config.read_text())
    if deciding(params) != deciding(config):
        raise SystemExit(f"{a.project / 'params.yaml'} is not {a.config}: these numbers would not be the committed comparison")
    commit, metrics = _git("rev-parse", "HEAD", cwd=a.project), a.metrics or a.project / "metrics"
    if a.rerun:
        base = json.loads(a.out.read_text())
        where = a.config.resolve().parent
        relative = a.config.resolve().relative_to(Path(_git("rev-parse", "--show-toplevel", cwd=where)))
        base_params = yaml.safe_load(_git("show", f"{base['commit']}:{relative.as_posix()}", cwd=where))
        summary = rerun(base, params, base_params, metrics, a.rerun, commit)
    else:
        summary = summarize(params, metrics, commit)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1) + "\n")
    n = len(params.get("variants") or {}) + len(params.get("pixel_variants") or {})
    reruns = f"; {', '.join(a.rerun)} re-run at {commit[:12]}" if a.rerun else ""
    print(f"wrote {a.out} ({n} variants, commit {summary['commit'][:12]}{reruns})", file=sys.stderr)


if __name__ == "__main__":
    main()
