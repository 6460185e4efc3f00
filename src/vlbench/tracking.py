"""MLflow: one experiment per pipeline, one run per variant.

The train stage opens the run (named after the variant) and writes its id to
``models/<variant>/run_id``; the evaluate stage reopens that same run, so params, the training
curves, the checkpoint, test metrics and pictures of a variant all sit in one run.
Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the project root (the
folder holding dvc.yaml, where DVC runs stages). If the store cannot be reached, the run falls
back to that local store and says so once, so training never dies for lack of tracking.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _experiment_id(mlflow, name: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifacts = (Path.cwd() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


def _probe(uri: str) -> None:
    """Fail in seconds on a dead HTTP server (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()


def connect(experiment: str):
    """Set the tracking URI and experiment; return (mlflow module, experiment id)."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    mlflow.set_tracking_uri(uri)
    try:
        _probe(uri)
        return mlflow, _experiment_id(mlflow, experiment)
    except Exception as e:
        if uri == default_uri():
            raise
        print(f"vlbench: MLflow store {uri} unreachable ({type(e).__name__}); logging to {default_uri()} instead",
              file=sys.stderr)
        mlflow.set_tracking_uri(default_uri())
        return mlflow, _experiment_id(mlflow, experiment)


def start_run(experiment: str, variant: str, run_id_file: Path, resume: bool):
    """Open the variant's run: reopen the one in ``run_id_file`` when resuming, else a new one."""
    mlflow, exp_id = connect(experiment)
    if resume and run_id_file.is_file():
        run_id = run_id_file.read_text().strip()
        try:
            return mlflow, mlflow.start_run(run_id=run_id)
        except Exception:
            print(f"vlbench: MLflow run {run_id} not found in {mlflow.get_tracking_uri()}; starting a new one",
                  file=sys.stderr)
    return mlflow, mlflow.start_run(experiment_id=exp_id, run_name=variant, tags={"variant": variant})
