"""A sweep through DVC experiments, for real: `dvc exp run --queue` + `dvc queue start` run each
experiment in a temporary copy of the repository (.dvc/tmp/exps/...). The metrics and dvc.lock are
committed (the project's .gitignore), so `dvc exp show` lists every experiment's metrics; the MLflow
runs land in the project's own store (DVC_ROOT), tagged with the experiment's name, under one
parent run for the baseline commit, with the DVC hashes of their inputs."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, env_with_venv, tiny_params

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def sh(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env_with_venv(), capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def dvc(*args, cwd) -> subprocess.CompletedProcess:
    return sh([str(Path(sys.executable).parent / "dvc"), *args], cwd)


def test_queued_experiments_show_their_metrics_and_land_in_the_projects_mlflow(tmp_path):
    import mlflow

    project = copy_project(tmp_path)
    params = tiny_params(n_images=40, steps=6)
    del params["variants"]["gridcap"]  # one variant keeps each experiment to three stages
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    (project / "metrics/.gitkeep").write_text("")
    sh(["git", "init", "-q"], project)
    sh([*GIT, "add", "-A"], project)
    sh([*GIT, "commit", "-qm", "init"], project)
    dvc("init", "-q", cwd=project)
    dvc("repro", cwd=project)
    sh([*GIT, "add", "-A"], project)  # dvc.lock, metrics/clip.json, the curve, the summary
    tracked = sh(["git", "ls-files"], project).stdout.split()
    assert {"dvc.lock", "metrics/clip.json", "metrics/curves/clip.csv", "metrics/summary.md"} <= set(tracked)
    assert not [f for f in tracked if f.startswith(("data/", "models/")) or f in ("mlflow.db", "metrics/clip_captions.json")]
    sh([*GIT, "commit", "-qm", "baseline"], project)
    baseline = sh(["git", "rev-parse", "HEAD"], project).stdout.strip()

    lrs = {"lr-high": 0.003, "lr-low": 0.0003}
    for name, lr in lrs.items():
        dvc("exp", "run", "--queue", "-S", f"variants.clip.optim.lr={lr}", "-n", name, cwd=project)
    dvc("queue", "start", "-j", "1", cwd=project)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = dvc("queue", "status", cwd=project).stdout
        if not any(s in status for s in ("Queued", "Running")):
            break
        time.sleep(3)
    else:
        pytest.fail(f"the queue did not finish:\n{status}")
    assert status.count("Success") == 2, status + "".join(dvc("queue", "logs", n, cwd=project).stdout for n in lrs)

    # dvc exp show: both experiments with their params and test metrics (none is "!")
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    exps = {r["name"]: r["data"] for b in shown for e in b.get("experiments") or [] for r in e["revs"]}
    assert set(exps) == set(lrs)
    for name, data in exps.items():
        assert data["params"]["params.yaml"]["data"]["variants"]["clip"]["optim"]["lr"] == lrs[name]
        metrics = data["metrics"]["metrics/clip.json"]["data"]["metrics"]
        assert 0 < metrics["rsum"] <= 600 and "i2t_R@1" in metrics
    assert exps["lr-high"]["metrics"] != exps["lr-low"]["metrics"]

    # MLflow: the project's store (not one in the temporary copies), a run per experiment
    # tagged with its name, under the sweep's parent run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlbench-test")
    runs = client.search_runs([exp.experiment_id])
    tagged = {r.data.tags["dvc_exp"]: r for r in runs if "dvc_exp" in r.data.tags}
    assert set(tagged) == set(lrs)
    parents = [r for r in runs if r.data.tags.get("dvc_sweep") == baseline]
    assert len(parents) == 1 and parents[0].info.run_name == f"sweep@{baseline[:7]}"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    splits_md5 = next(o["md5"] for o in lock["stages"]["split"]["outs"] if o["path"] == "data/splits")
    for name, r in tagged.items():
        assert r.info.status == "FINISHED" and r.info.run_name == "clip"
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["dvc_exp_baseline"] == r.data.tags["git_commit"] == baseline
        assert r.data.params["optim.lr"] == str(lrs[name])
        assert "test_i2t_R_at_1" in r.data.metrics  # evaluate reopened the same run in the copy
        digests = {i.dataset.name: i.dataset.digest for i in r.inputs.dataset_inputs}
        assert digests["data/splits"] == splits_md5
    baseline_runs = [r for r in runs if "dvc_exp" not in r.data.tags and "dvc_sweep" not in r.data.tags]
    assert [r.info.run_name for r in baseline_runs] == ["clip"]
    assert baseline_runs[0].data.tags["git_commit"] != baseline  # `dvc repro` ran before the baseline commit
    assert not list((project / ".dvc/tmp").rglob("mlflow.db"))
