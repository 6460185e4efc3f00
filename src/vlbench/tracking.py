"""MLflow: one experiment per pipeline, one run per variant.

The train stage opens the run (named after the variant), writes its id to
``models/<variant>/run_id`` and ends it (FINISHED); the evaluate stage reopens that same run and
ends it again, so params, the training curves, the checkpoint, test metrics and pictures of a
variant all sit in one run, whose duration counts training plus evaluation only (not the time
other stages ran in between). Only the train stage writes ``run_id``: an evaluation logged to a
store that lacks the training run gets a run of its own there and leaves the file alone.
Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the project root
(``io.project_root``: the repository DVC runs, also from a queued experiment's temporary copy).

Lineage, on every run: the git commit and whether tracked files differ from it (tags
``git_commit``, ``git_dirty``, ``mlflow.source.git.commit``); the DVC hashes (from ``dvc.lock``)
of the data and features it read, as MLflow dataset inputs whose digest is that hash; CPU, memory
and GPU use (MLflow system metrics, ``system/*``). Inside ``dvc exp run`` (queued or not) the run
is tagged ``dvc_exp`` (the experiment's name) and goes under one parent run per baseline commit
(``sweep@<commit>``). A run left RUNNING by a process that died without ending it is marked
KILLED by the next run of its variant on the same machine.

Training never dies for lack of tracking: if the store cannot be reached at the start, or fails
mid-run, ``Tracker`` says so once, moves the run to the local sqlite store (replaying everything
logged so far) and carries on there.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from . import io

# MLflow 3's experiment type: the model-training view in `mlflow ui` (runs, metrics, charts), not the
# GenAI one (traces). MLflow 3.17's UI takes the view from its sidebar switch or the URL
# (`?workflowType=machine_learning`) instead; the tag still marks the experiment for the API and
# older 3.x UIs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# files the pipeline itself rewrites while it runs: changes there do not make the code "dirty"
PIPELINE_OUTPUTS = ("dvc.lock", "metrics")


def default_uri() -> str:
    return f"sqlite:///{io.project_root() / 'mlflow.db'}"


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = (io.project_root() / "mlartifacts").as_uri() if client.tracking_uri.startswith("sqlite:") else None
        try:
            return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
        except Exception:
            exp = client.get_experiment_by_name(name)  # created meanwhile by a variant training in parallel
            if exp is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():
        if key not in exp.tags:  # an experiment made before; a kind chosen in the UI stays
            with contextlib.suppress(Exception):  # e.g. a user who may log runs but not tag the experiment
                client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _git(*args: str) -> str | None:
    import subprocess

    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def lineage_tags() -> dict[str, str]:
    """The git commit of the working directory and whether its tracked files differ from it
    (``dvc.lock`` and ``metrics/``, which the pipeline rewrites as it runs, aside); the DVC
    experiment this runs in, when inside ``dvc exp run``."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                       *(f":(exclude){p}" for p in PIPELINE_OUTPUTS))
        tags |= {"git_commit": commit, "mlflow.source.git.commit": commit,
                 "git_dirty": "unknown" if changed is None else str(bool(changed)).lower()}
    for env, tag in (("DVC_EXP_NAME", "dvc_exp"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _process_tags() -> dict[str, str]:
    """Who holds the run open: how a later run tells a live run from one whose process died."""
    import socket

    import psutil

    return {"vlbench.host": socket.gethostname(), "vlbench.pid": str(os.getpid()),
            "vlbench.pid_started": f"{psutil.Process().create_time():.3f}"}


def _process_alive(tags: dict) -> bool:
    import psutil

    try:
        started = psutil.Process(int(tags["vlbench.pid"])).create_time()
        return abs(started - float(tags["vlbench.pid_started"])) < 1  # not a later process with the same pid
    except (KeyError, ValueError, psutil.Error):
        return False


def _mark_stale_killed(client, exp_id: str, variant: str) -> None:
    """Runs of ``variant`` still RUNNING whose process on this machine is gone (SIGKILL, out of
    memory, a power cut: nothing could end the run) become KILLED, ending at their last metric."""
    import socket

    host = socket.gethostname()
    for r in client.search_runs([exp_id], filter_string=f"tags.variant = '{variant}' and attributes.status = 'RUNNING'"):
        if r.data.tags.get("vlbench.host") != host or _process_alive(r.data.tags):
            continue  # alive, or on another machine (which cannot be checked from here)
        last = max((m.timestamp for m in getattr(r.data, "_metric_objs", [])), default=r.info.start_time)
        client.set_terminated(r.info.run_id, "KILLED", end_time=max(last, r.info.start_time))
        print(f"vlbench: MLflow run {r.info.run_id} of {variant} was left RUNNING by a process that is gone; "
              f"marked KILLED", file=sys.stderr)


def dvc_lock_outs(root: Path) -> dict[str, dict]:
    """path (relative to ``root``) -> its entry (md5, size, nfiles) for every stage output in
    ``root/dvc.lock``; empty without one."""
    import yaml

    try:
        lock = yaml.safe_load((Path(root) / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {os.path.normpath(o["path"]): o for stage in (lock.get("stages") or {}).values()
            for o in stage.get("outs") or [] if "md5" in o}


def _size_and_files(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    files = [Path(d) / f for d, _, names in os.walk(path) for f in names]
    return sum(f.stat().st_size for f in files), len(files)


def dvc_datasets(paths, context: str) -> list:
    """MLflow dataset inputs for ``paths`` (stage deps such as data/splits, data/features/<backbone>)
    that dvc.lock records as some stage's output: name = the path, digest = DVC's md5 of it
    (``<md5>.dir`` for a folder; ``dvc`` finds the content in its cache by it), profile = its size
    and file count, tag ``mlflow.data.context`` = ``context``. A path dvc.lock does not know, or
    whose size or file count no longer matches it (changed outside DVC), is left out."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class DvcDataset(MetaDataset):
        def __init__(self, source, name, digest, profile):
            self._profile = profile
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self):
            return self._profile

        def to_dict(self):
            return super().to_dict() | {"profile": json.dumps(self._profile)}

    root = Path.cwd()
    outs = dvc_lock_outs(root)
    found = []
    for p in paths:
        rel = os.path.normpath(os.path.relpath(os.path.abspath(p), root))
        entry = outs.get(rel)
        if entry is None:
            continue
        profile = {k: entry[k] for k in ("size", "nfiles") if k in entry}
        actual = _size_and_files(root / rel) if (root / rel).exists() else (None, None)
        if ("size" in entry and actual[0] != entry["size"]) or ("nfiles" in entry and actual[1] != entry["nfiles"]):
            print(f"vlbench: {rel} differs from its dvc.lock entry (changed outside DVC?): not logged as an "
                  f"MLflow input", file=sys.stderr)
            continue
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(io.project_root() / rel))
        ds = DvcDataset(source, name=rel, digest=entry["md5"], profile=profile)
        found.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return found


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes on this machine (queued experiments run in parallel)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sweep_parent(client, exp_id: str) -> str | None:
    """Inside ``dvc exp run`` (DVC sets DVC_EXP_BASELINE_REV): the parent run of every experiment
    run on this baseline commit, created by the first of them (run name ``sweep@<commit>``, tag
    ``dvc_sweep`` = the commit). None outside DVC experiments."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if not baseline:
        return None
    with file_lock(io.project_root() / ".dvc" / "tmp" / "vlbench-sweep.lock"):
        found = client.search_runs([exp_id], filter_string=f"tags.dvc_sweep = '{baseline}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(exp_id, run_name=f"sweep@{baseline[:7]}",
                                tags={"dvc_sweep": baseline, "git_commit": baseline, "mlflow.source.git.commit": baseline})
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


def _probe(uri: str) -> None:
    """Fail in seconds on a dead HTTP server (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()


class Tracker:
    """The variant's MLflow run, as a context manager whose logging calls cannot fail training.

    Uses ``MlflowClient`` (no global active-run state). Under ``mlflow run`` (MLFLOW_RUN_ID set)
    a new variant run adopts the project run instead of creating a second one.

    ``inputs``: the stage's DVC-tracked deps to log as dataset inputs with ``context``
    (``dvc_datasets``). ``started_at``: when the stage's work began (``time.time()``), if before
    the tracker opens: a reopened run's duration then counts it. ``owns_run_id``: whether this
    stage writes ``run_id_file``. Only training does: the file is a DVC output of the train stage,
    so a later stage that has to start a run of its own (the trained run is not in this store)
    says so instead of rewriting it, which would make DVC see the train stage as changed.
    """

    def __init__(self, experiment: str, variant: str, run_id_file: Path, resume: bool, inputs=(),
                 context: str = "training", started_at: float | None = None, owns_run_id: bool = True):
        # MLflow's HTTP client retries a dead server for minutes by default; give up within seconds
        # and fall back instead (the environment still overrides these).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.experiment, self.variant = experiment, variant
        self.run_id_file, self.resume, self.owns_run_id = Path(run_id_file), resume, owns_run_id
        self.history: list[tuple[str, tuple, dict]] = []
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
        self.client = self.run_id = None
        self.inputs, self.context, self.started_at = list(inputs), context, started_at
        self.monitor = self.parent = None
        self.earlier_end = None  # a reopened run's end: this stage's work is added to it
        self.run_tags: dict = {}

    # -- opening

    def _open(self, uri: str, run_id: str | None) -> None:
        from mlflow import MlflowClient

        _probe(uri)
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, self.experiment)
        _mark_stale_killed(client, exp_id, self.variant)
        adopt = os.environ.get("MLFLOW_RUN_ID")
        if run_id is None and adopt and uri == (os.environ.get("MLFLOW_TRACKING_URI") or default_uri()):
            run_id = adopt
            client.set_tag(adopt, "mlflow.runName", self.variant)
        if run_id:
            try:
                run = client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, "variant", self.variant)
                self.client, self.run_id = client, run_id
                self.earlier_end, self.run_tags = run.info.end_time, run.data.tags
                self.parent = self.run_tags.get("mlflow.parentRunId")
                return
            except Exception as e:
                if "RESOURCE_DOES_NOT_EXIST" not in str(e) and "not found" not in str(e).lower():
                    raise
                print(f"vlbench: MLflow run {run_id} not found in {uri}; starting a new one", file=sys.stderr)
        tags = {"variant": self.variant}
        self.parent = _sweep_parent(client, exp_id)
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run = client.create_run(exp_id, run_name=self.variant, tags=tags)
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
        self._opened_at = self.started_at or time.time()
        self._log_lineage()
        self._start_monitor()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop_monitor()
        stopped = exc_type is KeyboardInterrupt or (exc_type is SystemExit and exc is not None and exc.code not in (0, None))
        status = "FINISHED" if exc_type is None else "KILLED" if stopped else "FAILED"
        end = None
        if self.earlier_end is not None:  # reopened: its earlier work plus this stage's, not the wait between
            end = self.earlier_end + int((time.time() - self._opened_at) * 1000)
        try:
            self.client.set_terminated(self.run_id, status, end_time=end)
        except Exception as e:
            self._fall_back(e)
            self.client.set_terminated(self.run_id, status)
        if self.parent:  # the sweep's parent run spans its children
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.parent, "FINISHED")
        return False

    def _log_lineage(self) -> None:
        from mlflow.entities import RunTag

        try:
            tags = _process_tags()
            if self.context == "training" or "git_commit" not in self.run_tags:  # the code that trained it
                tags |= lineage_tags()
            datasets = dvc_datasets(self.inputs, self.context)
        except Exception as e:  # lineage is worth a line on stderr, not a failed training
            print(f"vlbench: lineage not recorded ({type(e).__name__}: {e})", file=sys.stderr)
            return
        self._call("log_batch", tags=[RunTag(k, v) for k, v in tags.items()])
        if datasets:
            self._call("log_inputs", datasets=datasets)

    def _start_monitor(self) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, system/gpu_0_*, ...) every
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10) while the run is open; off with
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false. GPUs need nvidia-ml-py."""
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
            return
        import logging

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "GPU metrics skipped" lines
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=self.earlier_end is not None,
                                                tracking_uri=self.uri)
            self.monitor.start()
        except Exception as e:  # e.g. psutil missing: training goes on without
            print(f"vlbench: no system metrics ({type(e).__name__}: {e})", file=sys.stderr)
            self.monitor = None

    def _stop_monitor(self, wait: bool = True) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                if wait:
                    self.monitor.finish()  # logs what it sampled since its last batch
                else:  # its store is dead: its (daemon) thread may be stuck in retries, do not join it
                    self.monitor._shutdown_event.set()
            self.monitor = None

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

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        """A folder's files under ``artifact_path``; ``folder`` must outlive the tracker (a fallback
        to the local store replays the logging)."""
        self._call("log_artifacts", folder, artifact_path)

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
        why = (str(e).strip().splitlines() or [""])[0][:200]  # e.g. a 401 for wrong credentials
        print(f"vlbench: MLflow store {self.uri} unreachable ({type(e).__name__}: {why}); "
              f"logging to {default_uri()} instead", file=sys.stderr)

    def _fall_back(self, e: Exception) -> None:
        """Move the run to the local store, replay everything logged so far, continue there."""
        if self.uri == default_uri():
            raise e
        self._say_unreachable(e)
        self._stop_monitor(wait=False)
        self.uri = default_uri()
        self.earlier_end = None  # a new run: it starts now
        self._open(self.uri, None)
        self._write_run_id()
        self._start_monitor()
        for name, args, kwargs in self.history:
            getattr(self.client, name)(self.run_id, *args, **kwargs)

    def _write_run_id(self) -> None:
        from . import io

        if self.owns_run_id:
            io.write_text(self.run_id_file, self.run_id)
            return
        trained = self.run_id_file.read_text().strip() if self.run_id_file.is_file() else None
        if trained != self.run_id:
            kept = f"{self.run_id_file} keeps the training run {trained}" if trained else f"no {self.run_id_file}"
            print(f"vlbench: {self.context} of {self.variant} logged to MLflow run {self.run_id} in {self.uri} "
                  f"({kept})", file=sys.stderr)
