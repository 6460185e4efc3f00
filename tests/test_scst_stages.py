"""The SCST phase inside the real train stage (reward curve in the CSV and MLflow, SIGTERM during
SCST, resume bit-identical), and the evaluate stage's decodings table and diversity rows."""
import csv
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_GRID, env_with_venv, prepare_features, tiny_params
from conftest import train_gridcap as train

CE_STEPS, SCST_STEPS = 6, 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    params = tiny_params(n_images=30, steps=CE_STEPS)
    params["train"]["checkpoint_every"] = 2
    params["variants"]["gridcap"].update(TINY_GRID)
    params["variants"]["gridcap"]["scst"] = {"steps": SCST_STEPS, "samples": 3, "lr": 1e-4, "batch_size": 4, "max_len": 10,
                                             "warmup_steps": 3}  # the resumed run (below) continues mid-warm-up
    return prepare_features(tmp_path_factory.mktemp("scst"), params)


@pytest.fixture(scope="module")
def straight(prepared):
    r = train(prepared, "straight")
    assert r.returncode == 0, r.stderr
    return prepared / "models/straight"


def test_scst_logs_its_reward_curve(prepared, straight):
    with open(prepared / "metrics/curves/straight.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "lr", "scst_reward", "scst_baseline"]
    ce = [r for r in rows if r["loss"]]
    scst = [r for r in rows if not r["loss"]]
    assert [int(r["step"]) for r in scst] == list(range(CE_STEPS, CE_STEPS + SCST_STEPS))  # log_every 1
    assert all(float(r["scst_reward"]) >= 0 and r["scst_baseline"] for r in scst) and len(ce) == CE_STEPS
    assert [float(r["lr"]) for r in scst] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4, 1e-4])  # warm-up, then constant

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    run_id = (straight / "run_id").read_text()
    assert len(client.get_metric_history(run_id, "scst_reward")) == SCST_STEPS
    assert len(client.get_metric_history(run_id, "scst_baseline")) == SCST_STEPS
    # model selection goes on through SCST: dev evaluations every eval_every (checkpoint_every: 2) steps
    dev = client.get_metric_history(run_id, "dev_cider")
    assert sorted(m.step for m in dev) == [2, 4, 6, CE_STEPS + 2, CE_STEPS + 4]
    curve = list(csv.DictReader(open(prepared / "metrics/curves/dev/straight.csv")))
    assert [int(r["step"]) for r in curve] == [2, 4, 6, CE_STEPS + 2, CE_STEPS + 4]
    selected = json.loads((straight / "config.json").read_text())["selection"]
    best = max(float(r["value"]) for r in curve)
    assert selected["value"] == best and selected["step"] == min(int(r["step"]) for r in curve if float(r["value"]) == best)
    # the cross-entropy steps and the SCST steps are both counted (the selected step may be past CE_STEPS)
    assert (selected["steps_trained"], selected["scst_steps_trained"], selected["scst_steps"]) == (CE_STEPS, SCST_STEPS, SCST_STEPS)


def test_scst_that_lowers_dev_cider_leaves_the_cross_entropy_model(prepared):
    """SCST at a learning rate that wrecks the captioner: the dev evaluations during SCST are worse,
    so the saved model is the cross-entropy one, weight for weight; with scst.patience 1 SCST stops
    after its first evaluation."""
    import yaml

    params = yaml.safe_load((prepared / "params.yaml").read_text())
    ce_steps = 30  # a cross-entropy model with dev CIDEr above 0, so that SCST can do worse
    params["variants"]["gridcap"]["optim"].update(steps=ce_steps, lr=3e-3)
    params["variants"]["gridcap"]["scst"].update(lr=1.0, warmup_steps=0)
    (prepared / "params_wreck.yaml").write_text(yaml.safe_dump(params))
    params["variants"]["gridcap"]["scst"]["patience"] = 1  # SCST's own early stopping: after one worse evaluation
    (prepared / "params_wreck_patience1.yaml").write_text(yaml.safe_dump(params))
    params["variants"]["gridcap"]["scst"]["steps"] = 0
    (prepared / "params_ce.yaml").write_text(yaml.safe_dump(params))
    runs = (("wreck", "params_wreck.yaml"), ("wreck_patience1", "params_wreck_patience1.yaml"), ("ce_only", "params_ce.yaml"))
    for tag, file in runs:
        r = train(prepared, tag, params=file)
        assert r.returncode == 0, r.stderr
    ce_only = load_file(str(prepared / "models/ce_only/model.safetensors"))
    for tag, evaluations in (("wreck", 2), ("wreck_patience1", 1)):  # train.patience (0 here) never stops SCST
        curve = list(csv.DictReader(open(prepared / f"metrics/curves/dev/{tag}.csv")))
        ce = [float(r["value"]) for r in curve if int(r["step"]) <= ce_steps]
        scst = [float(r["value"]) for r in curve if int(r["step"]) > ce_steps]
        assert len(scst) == evaluations and max(scst) < max(ce), curve
        selected = json.loads((prepared / f"models/{tag}/config.json").read_text())["selection"]
        assert selected["scst_steps_trained"] == 2 * evaluations  # eval_every 2
        a = load_file(str(prepared / f"models/{tag}/model.safetensors"))
        assert a.keys() == ce_only.keys() and all(torch.equal(a[k], ce_only[k]) for k in a)


@pytest.mark.parametrize("start", ["best", "last"])
def test_scst_starts_from_the_selected_or_the_last_cross_entropy_weights(prepared, start):
    """SCST at a learning rate too small to move a weight (1e-12, one step), evaluated at its end:
    its dev evaluation scores the weights it started from, the best cross-entropy evaluation's
    (start: best) or the last one's (start: last; with optim.ema_decay, the weight average)."""
    import yaml

    params = yaml.safe_load((prepared / "params.yaml").read_text())
    ce_steps = 30
    params["variants"]["gridcap"]["optim"].update(steps=ce_steps, lr=3e-3, ema_decay=0.5)
    params["variants"]["gridcap"]["scst"].update(steps=1, lr=1e-12, warmup_steps=0, start=start)
    (prepared / f"params_start_{start}.yaml").write_text(yaml.safe_dump(params))
    r = train(prepared, f"start_{start}", params=f"params_start_{start}.yaml")
    assert r.returncode == 0, r.stderr
    curve = [(int(r["step"]), float(r["value"])) for r in csv.DictReader(open(prepared / f"metrics/curves/dev/start_{start}.csv"))]
    ce, scst = [v for s, v in curve if s <= ce_steps], [v for s, v in curve if s > ce_steps]
    assert len(ce) == ce_steps // 2 and len(scst) == 1, curve  # checkpoint_every (eval_every) 2
    assert max(ce) > ce[-1], curve  # this toy run's last evaluation is not its best: the two starts differ
    assert scst[0] == pytest.approx(max(ce) if start == "best" else ce[-1], abs=1e-6)


CONFIGURED_CE_STEPS = 30


def configured_cider_of(prepared, model_dir) -> float:
    """CIDEr-D of a saved model's own decoding on every dev image (SCST's configured dev metric)."""
    from vlbench.inputs import open_inputs
    from vlbench.models.trained import load_trained
    from vlbench.selection import make_dev_metric

    model, cfg, _ = load_trained(model_dir)
    val = open_inputs("val", str(prepared / "data/splits"), str(prepared / "data/features/efficientnet_lite0"), cfg)
    return make_dev_metric(model, cfg, val, str(prepared / "data/splits"), torch.device("cpu"), 0, decoding=cfg.decoding)()


@pytest.fixture(scope="module")
def configured(prepared):
    """A run with scst.dev_decoding: configured (beam 3), SCST evaluated after every step, from the
    last cross-entropy weights."""
    import yaml

    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["variants"]["gridcap"]["optim"].update(steps=CONFIGURED_CE_STEPS, lr=3e-3)
    params["variants"]["gridcap"]["decoding"] = {"strategy": "beam", "beam_size": 3, "length_penalty": 1.0}
    params["variants"]["gridcap"]["scst"].update(lr=3e-3, dev_decoding="configured", dev_images=0, eval_every=1,
                                                 start="last")
    (prepared / "params_configured.yaml").write_text(yaml.safe_dump(params))
    r = train(prepared, "configured", params="params_configured.yaml")
    assert r.returncode == 0, r.stderr
    return prepared / "models/configured"


def test_scst_selects_on_the_configured_decoding_when_asked(prepared, configured):
    """scst.dev_decoding: configured: the SCST start and every SCST evaluation (scst.eval_every) are
    scored by CIDEr-D of the variant's own decoding (beam 3 here) on scst.dev_images dev images, and
    the saved model is the best of those, scoring that value again when re-evaluated."""
    ce_steps = CONFIGURED_CE_STEPS
    curve = list(csv.DictReader(open(prepared / "metrics/curves/dev/configured.csv")))
    greedy = [(int(r["step"]), float(r["value"])) for r in curve if r["metric"] == "cider"]
    scored = [(int(r["step"]), float(r["value"])) for r in curve if r["metric"] == "configured_cider"]
    assert [s for s, _ in greedy] == list(range(2, ce_steps + 1, 2))  # cross-entropy: greedy, train.eval_every
    assert [s for s, _ in scored] == list(range(ce_steps, ce_steps + SCST_STEPS + 1))  # the start, then every step
    assert len({v for _, v in scored}) > 1, scored  # SCST moved the captions
    selected = json.loads((prepared / "models/configured/config.json").read_text())["selection"]
    best = max(v for _, v in scored)
    assert (selected["metric"], selected["value"]) == ("configured_cider", pytest.approx(best, abs=1e-4))
    assert selected["step"] == min(s for s, v in scored if v == best)

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    run_id = (prepared / "models/configured/run_id").read_text()
    assert [m.step for m in client.get_metric_history(run_id, "dev_configured_cider")] == [s for s, _ in scored]
    # start: last: the SCST start's weights are the last CE evaluation's, whose dev loss is not computed twice
    losses = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(losses) == list(range(2, ce_steps + 1, 2)) + list(range(ce_steps + 1, ce_steps + SCST_STEPS + 1))
    # the saved weights are the selected evaluation's: they score its value again
    assert configured_cider_of(prepared, prepared / "models/configured") == pytest.approx(best, abs=1e-4)


@pytest.fixture(scope="module")
def averaged(prepared, configured):
    """The configured run with scst.ema_decay: SCST's evaluations score its weight average."""
    import yaml

    params = yaml.safe_load((prepared / "params_configured.yaml").read_text())
    params["variants"]["gridcap"]["scst"]["ema_decay"] = 0.5
    (prepared / "params_averaged.yaml").write_text(yaml.safe_dump(params))
    r = train(prepared, "averaged", params="params_averaged.yaml")
    assert r.returncode == 0, r.stderr
    return prepared / "models/averaged"


def test_scst_weight_average_is_what_its_evaluations_score_and_the_saved_model(prepared, configured, averaged):
    """scst.ema_decay: SCST trains the same policy (the same candidates, so the same rewards, step
    for step) while its evaluations after the start score the weight average, not the trained
    weights; the saved model is the selected evaluation's average and scores its value again."""
    def rewards(tag):
        return [r["scst_reward"] for r in csv.DictReader(open(prepared / f"metrics/curves/{tag}.csv")) if not r["loss"]]

    def scst_evaluations(tag):
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(open(prepared / f"metrics/curves/dev/{tag}.csv"))
                if r["metric"] == "configured_cider"]

    assert rewards("averaged") == rewards("configured") and len(rewards("averaged")) == SCST_STEPS
    plain, avg = scst_evaluations("configured"), scst_evaluations("averaged")
    assert avg[0] == plain[0]  # the SCST start: nothing averaged yet
    assert [s for s, _ in avg] == [s for s, _ in plain] and avg[1:] != plain[1:], (avg, plain)
    selected = json.loads((averaged / "config.json").read_text())["selection"]
    best = max(v for _, v in avg)
    assert selected["value"] == pytest.approx(best, abs=1e-4)
    assert configured_cider_of(prepared, averaged) == pytest.approx(best, abs=1e-4)


def test_sigterm_during_scst_selected_on_the_configured_decoding_resumes_bit_identical(prepared, averaged):
    """The SCST selection (its metric, best weights and evaluations) and the SCST weight average come
    back from the checkpoint: the resumed run keeps the same model and dev curve as the straight one."""
    r = train(prepared, "averaged_killed", fault=f"TERM@{CONFIGURED_CE_STEPS + 2}", params="params_averaged.yaml")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    r = train(prepared, "averaged_killed", params="params_averaged.yaml")
    assert r.returncode == 0, r.stderr
    assert "resuming SCST from step 2/4" in r.stderr
    a = load_file(str(prepared / "models/averaged_killed/model.safetensors"))
    b = load_file(str(averaged / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = "metrics/curves/dev/{}.csv"
    assert (prepared / curve.format("averaged_killed")).read_text() == (prepared / curve.format("averaged")).read_text()
    import mlflow  # the dev loss of the weight average at each evaluation after the resume: a finer check than CIDEr

    client = mlflow.tracking.MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    losses = [[(m.step, m.value) for m in client.get_metric_history((prepared / f"models/{tag}/run_id").read_text(), "val_loss")
               if m.step > CONFIGURED_CE_STEPS + 2] for tag in ("averaged_killed", "averaged")]
    assert len(losses[0]) == SCST_STEPS - 2 and sorted(losses[0]) == sorted(losses[1])


def test_a_run_that_changes_only_scst_starts_from_the_kept_cross_entropy_end(prepared, configured, averaged):
    """``averaged`` differs from ``configured`` in scst.ema_decay alone: given configured's checkpoint
    folder (its ce_end.pt, kept after the stage) it skips the cross-entropy steps and ends weight for
    weight, curve for curve, where the run from scratch ends, in an MLflow run of its own that names
    the run it took them from. A change outside scst trains them again."""
    import mlflow
    import yaml

    kept = prepared / "checkpoints/configured"
    assert (kept / "ce_end.pt").is_file() and not (kept / "last.pt").exists()
    shutil.copytree(kept, prepared / "checkpoints/averaged_reused")
    r = train(prepared, "averaged_reused", params="params_averaged.yaml")
    assert r.returncode == 0, r.stderr
    assert "SCST starts from their end" in r.stderr
    assert "train gridcap: 100%|" in r.stderr and f"{CONFIGURED_CE_STEPS}/{CONFIGURED_CE_STEPS} [" in r.stderr
    a = load_file(str(prepared / "models/averaged_reused/model.safetensors"))
    b = load_file(str(averaged / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for curve in ("metrics/curves/{}.csv", "metrics/curves/dev/{}.csv"):
        assert (prepared / curve.format("averaged_reused")).read_text() == (prepared / curve.format("averaged")).read_text()

    client = mlflow.tracking.MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    reused_run, fresh_run, ce_run = ((prepared / f"models/{tag}/run_id").read_text()
                                     for tag in ("averaged_reused", "averaged", "configured"))
    assert len({reused_run, fresh_run, ce_run}) == 3
    assert client.get_run(reused_run).data.params["cross_entropy_run"] == ce_run
    for key in ("train_loss", "dev_cider", "dev_configured_cider", "scst_reward"):  # the copied curves and SCST's own
        (steps, values), (fresh_steps, fresh_values) = (
            zip(*sorted((m.step, m.value) for m in client.get_metric_history(run, key))) for run in (reused_run, fresh_run))
        assert steps == fresh_steps and values == pytest.approx(fresh_values, abs=1e-5), key  # copies: the curve's 5 decimals

    params = yaml.safe_load((prepared / "params_averaged.yaml").read_text())
    params["variants"]["gridcap"]["optim"]["lr"] = 1e-3
    (prepared / "params_other_ce.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(kept, prepared / "checkpoints/other_ce")
    r = train(prepared, "other_ce", params="params_other_ce.yaml")
    assert r.returncode == 0, r.stderr
    assert "ce_end.pt was made with other params; starting afresh" in r.stderr and "SCST starts" not in r.stderr


def test_sigterm_during_scst_resumes_bit_identical(prepared, straight):
    r = train(prepared, "killed", fault=f"TERM@{CE_STEPS + 2}")  # after the 2nd SCST step
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "after SCST step 2" in r.stderr
    assert not (prepared / "models/killed/model.safetensors").exists()
    r = train(prepared, "killed")
    assert r.returncode == 0, r.stderr
    assert "resuming SCST from step 2/4" in r.stderr
    assert "SCST gridcap: 100%" in r.stderr and f"{SCST_STEPS}/{SCST_STEPS}" in r.stderr  # its progress bar
    a, b = load_file(str(prepared / "models/killed/model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (prepared / "metrics/curves/killed.csv").read_text() == (prepared / "metrics/curves/straight.csv").read_text()
    assert not (prepared / "checkpoints/killed/last.pt").exists()


def evaluate(prepared, model_dir, metrics: str) -> dict:
    """Run the real evaluate stage on variant ``gridcap``'s model ``model_dir`` -> its metrics file."""
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{prepared / 'mlflow.db'}"
    r = subprocess.run([sys.executable, "-m", "vlbench", "evaluate", "--variant", "gridcap", "--model", str(model_dir),
                        "--features", "data/features/efficientnet_lite0", "--metrics", metrics],
                       cwd=prepared, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads((prepared / metrics / "gridcap.json").read_text())


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java on PATH")
def test_evaluate_scores_each_decoding_once_with_diversity(prepared, straight):
    from vlbench.stages.report import summarise

    result = evaluate(prepared, straight, "metrics_eval")
    assert list(result["decodings"]) == ["greedy", "beam3"] and result["decoding"] == "greedy"  # tiny_params: greedy
    head = {k: v for k, v in result["decodings"]["greedy"].items() if k != "captions_per_s"}
    assert head == result["metrics"]  # the configured decoding is the headline, scored once
    for row in (result["metrics"], result["nearest_neighbour"], result["chance"], result["references"],
                result["decodings"]["beam3"]):
        assert 0 < row["distinct_captions"] <= 1000 and 0 <= row["trigram_repeat"] <= 100
    captions = json.loads((prepared / "metrics_eval/gridcap_captions.json").read_text())
    assert set(captions[0]["decodings"]) == {"greedy", "beam3"}
    assert [c["caption"] for c in captions] == [c["decodings"]["greedy"] for c in captions]
    text = summarise([result])
    assert "*human references*" in text and "| gridcap | greedy (configured) |" in text.replace("**", "")


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java on PATH")
def test_a_reranking_run_reuses_the_cross_entropy_end_and_its_model_keeps_the_neighbours(prepared, configured):
    """``decoding.rerank_neighbours`` (consensus re-ranking, models/consensus.py) changes neither the
    cross-entropy steps (they decode greedily) nor SCST's updates, only which captions the configured
    decoding gives: a run that adds it starts from configured's ce_end.pt, evaluates SCST with the
    re-ranked beams, and saves the training images' pooled features and captions with the model, so
    the reloaded model scores its selected value again and the evaluate stage shows the re-ranked
    decoding beside the plain beam search."""
    import yaml

    params = yaml.safe_load((prepared / "params_configured.yaml").read_text())
    params["variants"]["gridcap"]["decoding"].update(rerank_neighbours=3, rerank_weight=2.0)
    (prepared / "params_reranked.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(prepared / "checkpoints/configured", prepared / "checkpoints/reranked")
    r = train(prepared, "reranked", params="params_reranked.yaml")
    assert r.returncode == 0, r.stderr
    assert "SCST starts from their end" in r.stderr
    folder = prepared / "models/reranked"
    train_ids = json.loads((prepared / "data/features/efficientnet_lite0/train_ids.json").read_text())
    features = load_file(str(folder / "neighbours.safetensors"))["features"]
    captions = json.loads((folder / "neighbours.json").read_text())
    assert features.shape[0] == len(captions) == len(train_ids) and all(len(c) == 5 for c in captions)
    assert torch.allclose(features.float().norm(dim=-1), torch.ones(len(train_ids)), atol=1e-2)  # unit length (fp16)
    selected = json.loads((folder / "config.json").read_text())["selection"]
    assert selected["metric"] == "configured_cider"
    assert configured_cider_of(prepared, folder) == pytest.approx(selected["value"], abs=1e-4)
    # the same SCST updates: the SCST start scores differently only through the re-ranking
    curve = {tag: [(int(r["step"]), float(r["value"])) for r in csv.DictReader(open(prepared / f"metrics/curves/dev/{tag}.csv"))
                   if r["metric"] == "configured_cider"] for tag in ("configured", "reranked")}
    assert [s for s, _ in curve["reranked"]] == [s for s, _ in curve["configured"]]

    result = evaluate(prepared, folder, "metrics_reranked")
    assert result["decoding"] == "beam3_lp1_rerank3x2"
    assert list(result["decodings"]) == ["greedy", "beam3_lp1", "beam3_lp1_rerank3x2"]
