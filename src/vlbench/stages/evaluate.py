"""Stage `evaluate`: score one trained variant on the test split.

Alignment: recall@1/5/10 both ways (5 captions per image grouped), median/mean rank, next to
chance. Captioning: pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when available), next
to a chance baseline (a random training caption per image). Both: speed and peak memory.
Writes ``metrics/<variant>.json``, ``metrics/pictures/<variant>.png`` and, for captioners,
``metrics/<variant>_captions.json``; logs them to the variant's MLflow run, with the variant as
pyfunc models (serving.py) registered under its name (promotion.py: the ``champion`` alias).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from .. import io
from ..params import load_params, section
from ..promotion import register_and_promote
from ..runtime import configure_threads, pick_device
from ..scoring import mlflow_test_metrics, score_test_split
from ..serving import save_models
from ..tracking import Tracker, file_lock


def run(params_path: str, name: str, model_dir: str, features_dir: str, splits_dir: str, metrics_dir: str) -> None:
    started_at = time.time()  # the run's duration counts the evaluation (after its training)
    raw = load_params(params_path)
    tcfg, tracking = section(raw, "train"), section(raw, "tracking")
    device = pick_device(tcfg.device)
    features = Path(features_dir) if features_dir else None
    result, paths, search_index = score_test_split(name, Path(model_dir), raw, Path(splits_dir), features,
                                                   Path(splits_dir), features, Path(metrics_dir), device)
    metrics, metrics_dir = result["metrics"], Path(metrics_dir)
    picture, captions_file = metrics_dir / "pictures" / f"{name}.png", metrics_dir / f"{name}_captions.json"
    read = [splits_dir, features_dir or str(Path(splits_dir).parent / "raw")]  # their DVC hashes: lineage
    # the saved models stay on disk until the tracker closes: a fallback to the local store re-logs them
    with tempfile.TemporaryDirectory(prefix="vlbench-models-") as staging, \
            Tracker(tracking.experiment, name, Path(model_dir) / "run_id", resume=True, inputs=read,
                    context="evaluation", started_at=started_at, owns_run_id=False) as mlflow:
        mlflow.log_metrics(mlflow_test_metrics(result))
        mlflow.log_artifact(str(metrics_dir / f"{name}.json"), "evaluation")
        mlflow.log_artifact(str(picture), "pictures")
        if result["family"] == "captioning":
            mlflow.log_artifact(str(captions_file), "evaluation")
        example = paths[0] if paths and Path(paths[0]).is_file() else None
        for artifact_path, folder in save_models(model_dir, result["family"], staging, example, search_index).items():
            mlflow.log_artifacts(str(folder), artifact_path)
        data = raw.get("data") or {}
        register(mlflow, name, result["family"], metrics, str(data.get("name")), str(data.get("root") or ""))
    print(json.dumps({"variant": name, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()}}))


def register(tracker: Tracker, name: str, family: str, metrics: dict, dataset: str, data_root: str) -> None:
    """The logged model as a new version of ``name`` in the run's store (promotion.py). A registry
    that fails is one line on stderr: the evaluation is done and logged."""
    # queued DVC experiments evaluate in parallel: one compares and moves the alias at a time
    dvc_tmp = io.project_root() / ".dvc" / "tmp"
    lock = file_lock(dvc_tmp / "vlbench-registry.lock") if dvc_tmp.parent.is_dir() else contextlib.nullcontext()
    try:
        with lock:
            register_and_promote(tracker.client, tracker.run_id, name, family, metrics, dataset, data_root)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"vlbench: {name} not registered in {tracker.uri} ({type(e).__name__}: {why})", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads evaluate, train, tracking, features.image_size)")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--model", default=None, help="trained model folder (default models/<variant>)")
    ap.add_argument("--features", default=None,
                    help="features folder of the variant's image encoder (not for pixel_variants, which read images)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--metrics", default="metrics", help="folder for <variant>.json and pictures/")
    a = ap.parse_args(argv)
    configure_threads(section(load_params(a.params), "train").threads)
    run(a.params, a.variant, a.model or f"models/{a.variant}", a.features, a.splits, a.metrics)
