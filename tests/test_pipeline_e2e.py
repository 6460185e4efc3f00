"""The whole pipeline for real: `dvc repro` in a temporary git repo on tiny params, then the
metrics JSON, the summary and the MLflow runs read back from the sqlite store."""
import json
import subprocess

import pytest
import yaml

from conftest import env_with_venv, tiny_params

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env_with_venv(), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def dvc(*args, cwd):
    import sys
    from pathlib import Path

    return sh([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd)


@pytest.fixture
def repo(project):
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(n_images=40, steps=6), sort_keys=False))
    (project / ".gitignore").write_text("mlflow.db\nmlartifacts/\n/models/\n/data/\n")
    sh(["git", "init", "-q"], project)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], project)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], project)
    dvc("init", "-q", cwd=project)
    return project


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_end_to_end(repo):
    first = dvc("repro", cwd=repo)
    ran = stages_run(first.stdout)
    assert {"download", "split", "features@efficientnet_lite0", "train@clip", "train@gridcap",
            "evaluate@clip", "evaluate@gridcap", "report"} <= ran, first.stdout

    clip = json.loads((repo / "metrics/clip.json").read_text())
    assert clip["family"] == "alignment" and clip["images"] == 12 and clip["captions"] == 60
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_median_rank"):
        value = clip["metrics"][key]
        assert value >= 1 if key.endswith("rank") else 0 <= value <= 100
    cap = json.loads((repo / "metrics/gridcap.json").read_text())
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"} <= set(cap["metrics"])
    assert len(json.loads((repo / "metrics/gridcap_captions.json").read_text())) == 12
    summary = (repo / "metrics/summary.md").read_text()
    assert "| clip |" in summary and "| gridcap |" in summary and "*chance*" in summary
    assert (repo / "metrics/pictures/clip.png").stat().st_size > 1000
    assert (repo / "metrics/curves.png").is_file()

    # MLflow: one run per variant in the sqlite store, with params, curves, test metrics, checkpoint, picture
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlbench-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"clip", "gridcap"}
    for name, r in runs.items():
        assert r.info.run_id == (repo / "models" / name / "run_id").read_text().strip()
        assert r.data.params["optim.steps"] == "6"
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 6
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")}
        assert "checkpoint/model.safetensors" in arts
        assert [a.path for a in client.list_artifacts(r.info.run_id, "pictures")] == [f"pictures/{name}.png"]
    assert "test_i2t_R_at_1" in runs["clip"].data.metrics
    assert "test_CIDEr" in runs["gridcap"].data.metrics

    # a second repro does nothing
    second = dvc("repro", cwd=repo)
    assert stages_run(second.stdout) == set(), second.stdout

    # editing one variant's params re-runs only that variant (and the report)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["variants"]["gridcap"]["optim"]["lr"] = 2e-3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc("repro", cwd=repo)
    assert stages_run(third.stdout) == {"train@gridcap", "evaluate@gridcap", "report"}, third.stdout
