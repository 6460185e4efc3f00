"""benchmarks/flickr8k/summarize.py on metrics the real train and evaluate stages wrote."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, env_with_venv, prepare_features, tiny_params


def load_summarize():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "flickr8k" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny git project where `clip` and `gridcap` were trained and evaluated by the real stages."""
    d = tmp_path_factory.mktemp("f8ksum")
    params = tiny_params(steps=3)
    prepare_features(d, params)
    env = dict(env_with_venv(), MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}")
    for stage in ("train", "evaluate"):
        for v in ("clip", "gridcap"):
            r = subprocess.run([sys.executable, "-m", "vlbench", stage, "--variant", v, "--features",
                                "data/features/efficientnet_lite0"], cwd=d, env=env, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
    (d / "config.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=d, check=True)
    return d


def run_summarize(d, *extra):
    out = d / "summary.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/flickr8k/summarize.py"), "--project", str(d),
                        "--config", str(d / "config.yaml"), "--out", str(out), *extra], capture_output=True, text=True)
    return r, out


def test_summary_holds_every_variant_and_the_baselines_from_the_metrics_files(evaluated):
    r, out = run_summarize(evaluated)
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    clip = json.loads((evaluated / "metrics/clip.json").read_text())
    cap = json.loads((evaluated / "metrics/gridcap.json").read_text())
    assert summary["clip"]["rsum"] == clip["metrics"]["rsum"]
    assert summary["clip"]["t2i_R@1"] == clip["metrics"]["t2i_R@1"]
    assert summary["gridcap"]["CIDEr"] == cap["metrics"]["CIDEr"]
    assert summary["gridcap"]["trigram_repeat"] == cap["metrics"]["trigram_repeat"]
    assert summary["random_projections"] == clip["random_projection"]
    assert summary["nearest_neighbour"] == cap["nearest_neighbour"]
    assert summary["chance"]["i2t_R@1"] == clip["chance"]["i2t_R@1"]
    assert summary["chance"]["CIDEr"] == cap["chance"]["CIDEr"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=evaluated, capture_output=True, text=True).stdout.strip()
    assert summary["commit"] == head and len(head) == 40


def test_refuses_params_that_are_not_the_configuration(evaluated, tmp_path):
    other = tiny_params(steps=4)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/flickr8k/summarize.py"), "--project", str(evaluated),
                        "--config", str(tmp_path / "other.yaml"), "--out", str(tmp_path / "s.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "is not" in r.stderr
    assert not (tmp_path / "s.json").exists()


def test_tracking_and_transfer_sections_do_not_count(evaluated, tmp_path):
    config = yaml.safe_load((evaluated / "config.yaml").read_text())
    config["tracking"] = {"experiment": "elsewhere"}
    config["transfer"] = {"datasets": {"coco": {"name": "coco", "root": "/nowhere"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/flickr8k/summarize.py"), "--project", str(evaluated),
                        "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "s.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["clip"]["rsum"] > 0


def test_refuses_when_a_variant_has_no_metrics(evaluated, tmp_path):
    summarize = load_summarize()
    params = yaml.safe_load((evaluated / "params.yaml").read_text())
    params["variants"]["untrained"] = params["variants"]["clip"]
    with pytest.raises(SystemExit, match="untrained"):
        summarize.summarize(params, evaluated / "metrics", "0" * 40)


def test_rerun_replaces_only_the_rerun_variants_rows(evaluated, tmp_path):
    """One variant retrained with other params: --rerun takes its new row and keeps the others of the
    summary's commit; changed params of another variant are refused."""
    d = tmp_path / "project"
    shutil.copytree(evaluated, d)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "config.yaml"], cwd=d, check=True)
    subprocess.run(git + ["commit", "-qm", "config"], cwd=d, check=True)
    r, out = run_summarize(d)
    assert r.returncode == 0, r.stderr
    base = json.loads(out.read_text())

    params = yaml.safe_load((d / "params.yaml").read_text())
    params["variants"]["gridcap"]["optim"]["steps"] = 12
    for name in ("params.yaml", "config.yaml"):
        (d / name).write_text(yaml.safe_dump(params))
    env = dict(env_with_venv(), MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}")
    for stage in ("train", "evaluate"):
        r = subprocess.run([sys.executable, "-m", "vlbench", stage, "--variant", "gridcap", "--features",
                            "data/features/efficientnet_lite0"], cwd=d, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    subprocess.run(git + ["commit", "-qam", "gridcap: more steps"], cwd=d, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True).stdout.strip()

    r, out = run_summarize(d, "--rerun", "gridcap")
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    cap = json.loads((d / "metrics/gridcap.json").read_text())
    assert summary["gridcap"]["CIDEr"] == cap["metrics"]["CIDEr"] and summary["gridcap"] != base["gridcap"]
    assert {k: v for k, v in summary.items() if k not in ("gridcap", "reruns")} == \
        {k: v for k, v in base.items() if k != "gridcap"}  # the other rows, baselines and commit of the base
    assert summary["reruns"] == {"gridcap": head}

    params["variants"]["clip"]["optim"]["steps"] = 4  # another variant's params changed, not re-run
    for name in ("params.yaml", "config.yaml"):
        (d / name).write_text(yaml.safe_dump(params))
    before = out.read_text()
    r, out = run_summarize(d, "--rerun", "gridcap")
    assert r.returncode != 0 and "changed since commit" in r.stderr
    assert out.read_text() == before
