"""Model selection on the dev split (train.eval_every / select_on / patience / dev_images): the saved
model is the best dev evaluation's, not the last step's; training stops after `patience`
evaluations without improvement; a run killed and resumed ends bit-identical to an uninterrupted
one, early stop included; the real dev metrics (rsum, greedy CIDEr) run in the train stage."""
import json
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import env_with_venv, prepare_features, tiny_params
from vlbench.selection import Selection
from vlbench.training import WeightAverage

# The train stage with its dev metric replaced by a script: the value at each evaluated step comes
# from DEV_VALUES, and the model's trainable weights at that step are saved to DEV_SNAPSHOTS. The
# step is the one the stage passes to fault_point just before it evaluates.
SCRIPTED = """
import json, os, sys
import torch
import vlbench.stages.train as train
from vlbench.models.trained import trainable_state

values, snapshots, current = json.loads(os.environ["DEV_VALUES"]), os.environ["DEV_SNAPSHOTS"], {}
real_fault_point = train.fault_point

def fault_point(done):
    current["step"] = done
    real_fault_point(done)

def make_dev_metric(model, *args, **kwargs):
    def dev():
        step = current["step"]
        torch.save({k: v.clone() for k, v in trainable_state(model).items()}, f"{snapshots}/{step}.pt")
        return values[str(step)]
    return dev

train.fault_point, train.make_dev_metric = fault_point, make_dev_metric
train.main(sys.argv[1:])
"""

STEPS = 20
# evaluated every 2 steps: the best is step 8; 10, 12 and 14 do not beat it (14 ties), so with
# patience 3 training stops after step 14 of 20
DEV_VALUES = {2: 1.0, 4: 5.0, 6: 4.0, 8: 6.0, 10: 5.5, 12: 5.9, 14: 6.0, 16: 9.0, 18: 9.0, 20: 9.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = tiny_params(n_images=30, steps=STEPS)
    params["train"].update(checkpoint_every=5, eval_every=2, patience=3)
    return prepare_features(tmp_path_factory.mktemp("selection"), params)


def scripted_train(d, tag: str, fault: str | None = None, params: str = "params.yaml") -> subprocess.CompletedProcess:
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    env["DEV_VALUES"] = json.dumps(DEV_VALUES)
    env["DEV_SNAPSHOTS"] = str(d / "snapshots" / tag)
    (d / "snapshots" / tag).mkdir(parents=True, exist_ok=True)
    env.pop("VLBENCH_FAULT", None)
    if fault:
        env["VLBENCH_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-c", SCRIPTED, "--params", params, "--variant", "gridcap", "--features", "data/features/efficientnet_lite0",
         "--out", f"models/{tag}", "--curves", f"metrics/curves/{tag}.csv", "--checkpoints", f"checkpoints/{tag}"],
        cwd=d, env=env, capture_output=True, text=True)


def saved_equals(model_file, snapshot_file) -> bool:
    saved, snap = load_file(str(model_file)), torch.load(snapshot_file, weights_only=True)
    return set(saved) <= set(snap) and all(torch.equal(saved[k], snap[k]) for k in saved)


@pytest.fixture(scope="module")
def straight(project):
    r = scripted_train(project, "straight")
    assert r.returncode == 0, r.stderr
    return r


def test_the_best_dev_step_is_the_model_not_the_last(project, straight):
    model = project / "models/straight/model.safetensors"
    snapshots = project / "snapshots/straight"
    assert sorted(int(p.stem) for p in snapshots.glob("*.pt")) == [2, 4, 6, 8, 10, 12, 14]
    assert saved_equals(model, snapshots / "8.pt")
    assert not saved_equals(model, snapshots / "14.pt")  # training went on after the best step
    selection = json.loads((project / "models/straight/config.json").read_text())["selection"]
    assert selection == {"metric": "cider", "step": 8, "value": 6.0, "evaluations": 7, "steps_trained": 14,
                         "steps": STEPS, "stopped_early": True}
    dev = pd.read_csv(project / "metrics/curves/dev/straight.csv")
    assert dev["step"].tolist() == [2, 4, 6, 8, 10, 12, 14] and set(dev["metric"]) == {"cider"}
    assert dev["value"].tolist() == [DEV_VALUES[s] for s in dev["step"]]


def test_early_stop_after_patience_evaluations_without_improvement(project, straight):
    assert "early stop after step 14: no better dev cider in 3 evaluations (best 6 at step 8)" in straight.stderr
    assert "gridcap: 14 steps" in straight.stdout
    curve = pd.read_csv(project / "metrics/curves/straight.csv")
    assert curve["step"].tolist() == list(range(14))  # no step after the stop
    assert not (project / "checkpoints/straight/last.pt").exists()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run_id = (project / "models/straight/run_id").read_text().strip()
    history = client.get_metric_history(run_id, "dev_cider")
    assert [(m.step, m.value) for m in history] == [(s, DEV_VALUES[s]) for s in range(2, 15, 2)]
    assert [m.value for m in client.get_metric_history(run_id, "best_dev_cider")][-1] == 6.0
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == list(range(2, 15, 2))
    assert client.get_run(run_id).data.metrics["selected_step"] == 8


def test_resume_keeps_the_best_so_far_and_ends_identical(project, straight):
    """Killed after step 13, between the best evaluation (step 8) and the stop (step 14): the run
    resumes from the checkpoint of step 10 (best 8, one evaluation without improvement since), runs
    the evaluation of step 12 again, and stops where the uninterrupted run did, with its model."""
    tag = "resumed"
    r = scripted_train(project, tag, fault="KILL@13")
    assert r.returncode == -signal.SIGKILL, r.stderr
    state = torch.load(project / f"checkpoints/{tag}/last.pt", weights_only=True)
    assert state["step"] == 10 and (state["selection"]["best_step"], state["selection"]["bad"]) == (8, 1)
    r = scripted_train(project, tag)
    assert r.returncode == 0, r.stderr
    assert f"resuming gridcap from step 10/{STEPS}" in r.stderr
    assert "early stop after step 14" in r.stderr
    straight_model = load_file(str(project / "models/straight/model.safetensors"))
    resumed_model = load_file(str(project / f"models/{tag}/model.safetensors"))
    assert straight_model.keys() == resumed_model.keys()
    assert all(torch.equal(straight_model[k], resumed_model[k]) for k in straight_model)
    for f in ("curves/{}.csv", "curves/dev/{}.csv"):
        assert (project / "metrics" / f.format(tag)).read_text() == (project / "metrics" / f.format("straight")).read_text()
    config = json.loads((project / f"models/{tag}/config.json").read_text())
    assert config["selection"] == json.loads((project / "models/straight/config.json").read_text())["selection"]


def test_weight_average_is_what_dev_scores_and_the_model(project, straight):
    """optim.ema_decay: each dev evaluation scores the moving average of the weights, not the
    step's own; the saved model is the best evaluation's average; training itself is unchanged;
    the average is in the checkpoint, so a killed run resumes bit-identical."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"]["gridcap"]["optim"]["ema_decay"] = 0.5
    (project / "ema.yaml").write_text(yaml.safe_dump(params))
    r = scripted_train(project, "ema", params="ema.yaml")
    assert r.returncode == 0, r.stderr
    r = scripted_train(project, "ema_killed", fault="KILL@13", params="ema.yaml")
    assert r.returncode == -signal.SIGKILL, r.stderr
    state = torch.load(project / "checkpoints/ema_killed/last.pt", weights_only=True)
    assert state["step"] == 10
    scored = torch.load(project / "snapshots/ema_killed/10.pt", weights_only=True)
    assert all(torch.equal(scored[k], v) for k, v in state["average"].items())
    assert not all(torch.equal(scored[k], state["model"][k]) for k in state["average"])  # not the step's weights
    r = scripted_train(project, "ema_killed", params="ema.yaml")
    assert r.returncode == 0, r.stderr

    ema = load_file(str(project / "models/ema/model.safetensors"))
    assert saved_equals(project / "models/ema/model.safetensors", project / "snapshots/ema/8.pt")
    resumed = load_file(str(project / "models/ema_killed/model.safetensors"))
    assert all(torch.equal(ema[k], resumed[k]) for k in ema)
    plain = load_file(str(project / "models/straight/model.safetensors"))
    assert not all(torch.equal(ema[k], plain[k]) for k in ema)
    # the average does not feed back into training: the same losses as without it
    assert (project / "metrics/curves/ema.csv").read_text() == (project / "metrics/curves/straight.csv").read_text()


def test_weight_average_arithmetic():
    w = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    average = WeightAverage({"w": w}, decay=0.5)
    with torch.no_grad():
        w.copy_(torch.tensor([10.0, 0.0]))
    average.update(0)  # d = min(0.5, 1/10) = 0.1
    assert torch.allclose(average.state_dict()["w"], torch.tensor([9.0, 1.0]))
    with torch.no_grad():
        w.copy_(torch.tensor([1.0, 1.0]))
    average.update(20)  # d = 0.5
    assert torch.allclose(average.state_dict()["w"], torch.tensor([5.0, 1.0]))
    with average.applied():
        assert torch.allclose(w.detach(), torch.tensor([5.0, 1.0]))
    assert torch.equal(w.detach(), torch.tensor([1.0, 1.0]))  # the trained weights are back


def test_alignment_selects_on_dev_rsum(project):
    """The real dev metric in the train stage: rsum on the val split (6 images, 30 captions)."""
    env_params = yaml.safe_load((project / "params.yaml").read_text())
    env_params["train"].update(eval_every=4, patience=0)
    env_params["variants"]["clip"]["optim"]["steps"] = 8
    (project / "clip.yaml").write_text(yaml.safe_dump(env_params))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "-m", "vlbench", "train", "--params", "clip.yaml", "--variant", "clip",
                        "--features", "data/features/efficientnet_lite0"], cwd=project, env={**env_with_venv(), **env},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dev = pd.read_csv(project / "metrics/curves/dev/clip.csv")
    assert dev["step"].tolist() == [4, 8] and set(dev["metric"]) == {"rsum"}
    assert all(0 <= v <= 600 for v in dev["value"])
    selection = json.loads((project / "models/clip/config.json").read_text())["selection"]
    best = dev.loc[dev["value"].idxmax()]  # the first of equal values
    assert (selection["metric"], selection["step"], selection["stopped_early"]) == ("rsum", best["step"], False)
    assert selection["value"] == pytest.approx(best["value"], abs=1e-4)


# ------------------------------------------------------------------------------------ units


def test_selection_state():
    sel = Selection("rsum", patience=2)
    weights = iter(range(10))
    assert sel.update(1, 10.0, lambda: next(weights)) and sel.weights == 0
    assert not sel.update(2, 10.0, lambda: next(weights))  # a tie is no improvement
    assert sel.update(3, 11.0, lambda: next(weights)) and (sel.best_step, sel.weights, sel.bad) == (3, 1, 0)
    assert not sel.update(4, 9.0, lambda: next(weights)) and not sel.exhausted
    assert not sel.update(5, 9.0, lambda: next(weights)) and sel.exhausted
    again = Selection("rsum", patience=2)
    again.load_state_dict(sel.state_dict())
    assert again.state_dict() == sel.state_dict()

    loss = Selection("val_loss", patience=0)  # lower is better; patience 0 never stops
    for step, v in enumerate([3.0, 2.0, 2.5, 2.6, 2.7, 2.8]):
        loss.update(step, v, lambda: None)
    assert (loss.best_step, loss.best, loss.exhausted) == (1, 2.0, False)


def test_dev_cider_of_a_captioner(trained_grid_captioner, batch, tmp_path):
    """Greedy captions of a captioner that learned its batch score high, the same each call, and
    evaluation draws nothing from torch's RNG (a resumed run would otherwise differ)."""
    import dataclasses

    from vlbench.config import DecodingConfig
    from vlbench.selection import make_dev_metric

    model, grid = trained_grid_captioner
    captions = batch[1]
    ids = [f"img{i}" for i in range(len(captions))]
    pd.DataFrame({"image_id": ids, "captions": [[c] for c in captions]}).to_parquet(tmp_path / "val.parquet")

    class Inputs:
        def __init__(self):
            self.ids = ids

        def __len__(self):
            return len(ids)

        def batch(self, rows):
            return grid[list(rows)]

    cfg = dataclasses.replace(model.cfg, decoding=DecodingConfig(strategy="beam", beam_size=3))  # dev decoding is greedy
    dev = make_dev_metric(model, cfg, Inputs(), str(tmp_path), torch.device("cpu"), max_images=10, batch_size=4)
    rng = torch.get_rng_state()
    first = dev()
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == dev() and first > 50


def test_report_shows_the_selected_step():
    from vlbench.stages.report import _selection

    results = [{"variant": "clip", "selection": {"metric": "rsum", "step": 300, "value": 412.5, "evaluations": 10,
                                                 "steps_trained": 1000, "steps": 1000, "stopped_early": False}},
               {"variant": "cap", "selection": {"metric": "cider", "step": 200, "value": 95.25, "evaluations": 5,
                                                "steps_trained": 500, "steps": 800, "stopped_early": True}},
               {"variant": "scst", "selection": {"metric": "cider", "step": 2600, "value": 45.5, "evaluations": 14,
                                                 "steps_trained": 2000, "steps": 2000, "stopped_early": False,
                                                 "scst_steps_trained": 800, "scst_steps": 800}},
               {"variant": "scst_early", "selection": {"metric": "cider", "step": 2200, "value": 45.5, "evaluations": 12,
                                                       "steps_trained": 2000, "steps": 2000, "stopped_early": False,
                                                       "scst_steps_trained": 600, "scst_steps": 800}},
               {"variant": "old", "selection": None}]  # a model trained before selection existed
    lines = _selection(results)
    assert "| clip | dev rsum | 300 | 1000 | 412.500 | 10 |" in lines
    assert "| cap | dev cider | 200 | 500 of 800 (early stop) | 95.250 | 5 |" in lines
    assert "| scst | dev cider | 2600 | 2000 + 800 SCST | 45.500 | 14 |" in lines
    assert "| scst_early | dev cider | 2200 | 2000 + 600 SCST of 800 (early stop) | 45.500 | 12 |" in lines
    assert not any("| old |" in line for line in lines)
