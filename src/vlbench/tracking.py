"""MLflow: one experiment per pipeline, one run per variant.

The train stage opens the run (named after the variant) and writes its id to
``models/<variant>/run_id``; the evaluate stage reopens that same run, so params, the training
curves, the checkpoint, test metrics and pictures of a variant all sit in one run.
Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the project root (the
folder holding dvc.yaml, where DVC runs stages).

Training never dies for lack of tracking: if the store cannot be reached at the start, or fails
mid-run, ``Tracker`` says so once, moves the run to the local sqlite store (replaying everything
logged so far) and carries on there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (Path.cwd() / "mlartifacts").as_uri() if client.tracking_uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=artifacts)


def _probe(uri: str) -> None:
    """Fail in seconds on a dead HTTP server (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()


class Tracker:
    """The variant's MLflow run, as a context manager whose logging calls cannot fail training.

    Uses ``MlflowClient`` (no global active-run state). Under ``mlflow run`` (MLFLOW_RUN_ID set)
    a new variant run adopts the project run instead of creating a second one.
    """

    def __init__(self, experiment: str, variant: str, run_id_file: Path, resume: bool):
        # MLflow's HTTP client retries a dead server for minutes by default; give up within seconds
        # and fall back instead (the environment still overrides these).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.experiment, self.variant = experiment, variant
        self.run_id_file, self.resume = Path(run_id_file), resume
        self.history: list[tuple[str, tuple, dict]] = []
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
        self.client = self.run_id = None

    # -- opening

    def _open(self, uri: str, run_id: str | None) -> None:
        from mlflow import MlflowClient

        _probe(uri)
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, self.experiment)
        adopt = os.environ.get("MLFLOW_RUN_ID")
        if run_id is None and adopt and uri == (os.environ.get("MLFLOW_TRACKING_URI") or default_uri()):
            run_id = adopt
            client.set_tag(adopt, "mlflow.runName", self.variant)
        if run_id:
            try:
                client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, "variant", self.variant)
                self.client, self.run_id = client, run_id
                return
            except Exception as e:
                if "RESOURCE_DOES_NOT_EXIST" not in str(e) and "not found" not in str(e).lower():
                    raise
                print(f"vlbench: MLflow run {run_id} not found in {uri}; starting a new one", file=sys.stderr)
        run = client.create_run(exp_id, run_name=self.variant, tags={"variant": self.variant})
        self.client, self.run_id = client, run.info.run_id

    def __enter__(self):
        run_id = self.run_id_file.read_text().strip() if self.resume and self.run_id_file.is_file() else None
        try:
            self._open(self.uri, run_id)
        except Exception as e:
            if self.uri == default_uri():
                raise
            self._say_unreachable(e)
            self.uri = default_uri()
            self._open(self.uri, run_id)
        self._write_run_id()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._call("set_terminated", status="FINISHED" if exc_type is None else "FAILED", record=False)
        return False

    # -- logging

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self._call("log_batch", params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def _call(self, name: str, *args, record: bool = True, **kwargs) -> None:
        if record:
            self.history.append((name, args, kwargs))
        try:
            getattr(self.client, name)(self.run_id, *args, **kwargs)
        except Exception as e:
            self._fall_back(e)  # replays the history, this call included when recorded
            if not record:
                getattr(self.client, name)(self.run_id, *args, **kwargs)

    # -- failure

    def _say_unreachable(self, e: Exception) -> None:
        print(f"vlbench: MLflow store {self.uri} unreachable ({type(e).__name__}); "
              f"logging to {default_uri()} instead", file=sys.stderr)

    def _fall_back(self, e: Exception) -> None:
        """Move the run to the local store, replay everything logged so far, continue there."""
        if self.uri == default_uri():
            raise e
        self._say_unreachable(e)
        self.uri = default_uri()
        self._open(self.uri, None)
        self._write_run_id()
        for name, args, kwargs in self.history:
            getattr(self.client, name)(self.run_id, *args, **kwargs)

    def _write_run_id(self) -> None:
        from . import io

        io.write_text(self.run_id_file, self.run_id)
