"""Kill a real training process (SIGKILL, SIGTERM), run it again: it resumes from the last
checkpoint, in the same MLflow run, and ends bit-identical to an uninterrupted run."""
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import env_with_venv, prepare_features, tiny_params
from conftest import train_gridcap as train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    params = tiny_params(n_images=30, steps=30)
    params["train"]["checkpoint_every"] = 10
    return prepare_features(tmp_path_factory.mktemp("resume"), params)


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(prepared):
    r = train(prepared, "straight")
    assert r.returncode == 0, r.stderr
    return prepared / "models/straight/model.safetensors"


@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_resume_after_signal_is_bit_identical(prepared, uninterrupted, sig):
    tag = f"killed_{sig.lower()}"
    r = train(prepared, tag, fault=f"{sig}@15")
    assert r.returncode in (-getattr(signal, f"SIG{sig}"), 128 + getattr(signal, f"SIG{sig}")), r.stderr
    assert not (prepared / f"models/{tag}/model.safetensors").exists()
    assert (prepared / f"checkpoints/{tag}/last.pt").is_file()
    run_id = (prepared / f"models/{tag}/run_id").read_text()

    r = train(prepared, tag)
    assert r.returncode == 0, r.stderr
    resumed_from = 15 if sig == "TERM" else 10  # SIGTERM saves on the way out; SIGKILL loses steps since the last one
    assert f"resuming gridcap from step {resumed_from}/30" in r.stderr
    assert same_weights(prepared / f"models/{tag}/model.safetensors", uninterrupted)
    assert (prepared / f"models/{tag}/run_id").read_text() == run_id  # the same MLflow run continues
    assert not (prepared / f"checkpoints/{tag}/last.pt").exists()
    curve = (prepared / f"metrics/curves/{tag}.csv").read_text()
    assert curve == (prepared / "metrics/curves/straight.csv").read_text()


def test_checkpoint_from_other_params_is_ignored(prepared, uninterrupted):
    r = train(prepared, "changed", fault="KILL@12")
    assert r.returncode == -signal.SIGKILL
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["variants"]["gridcap"]["optim"]["lr"] = 5e-4
    (prepared / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        r = train(prepared, "changed")
    finally:
        params["variants"]["gridcap"]["optim"]["lr"] = 1e-3
        (prepared / "params.yaml").write_text(yaml.safe_dump(params))
    assert r.returncode == 0, r.stderr
    assert "made with other params; starting afresh" in r.stderr
    assert not same_weights(prepared / "models/changed/model.safetensors", uninterrupted)


def test_corrupt_checkpoint_is_ignored(prepared, uninterrupted):
    ckpt = prepared / "checkpoints/corrupt/last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x80\x04not a checkpoint")
    r = train(prepared, "corrupt")
    assert r.returncode == 0, r.stderr
    assert "ignoring unreadable checkpoint" in r.stderr
    assert same_weights(prepared / "models/corrupt/model.safetensors", uninterrupted)


def test_features_resume_from_completed_shards(tmp_path):
    """Kill the features stage after its first shard; the rerun encodes only the rest and
    produces exactly the features of an uninterrupted run."""
    import numpy as np

    from conftest import run_cli

    params = tiny_params(n_images=60)
    params["split"] = {"seed": 0, "val_size": 6, "test_size": 6}
    params["features"]["batch_size"] = 8  # shards of 512 // 8 * 8 = 512 images: one shard per split
    d = prepare_features(tmp_path, params)
    reference = np.load(d / "data/features/efficientnet_lite0/train.npy")

    env = env_with_venv()
    env["VLBENCH_FAULT"] = "KILL@2"  # after the train and val shards, before test
    args = [sys.executable, "-m", "vlbench", "features", "--backbone", "efficientnet_lite0", "--out", "data/features/again"]
    r = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    assert not (d / "data/features/again").exists()  # nothing half-written
    assert sorted(p.name for p in (d / "checkpoints/features/efficientnet_lite0").glob("*.npy")) == [
        "train_00000.npy", "val_00000.npy"]
    r = run_cli(["features", "--backbone", "efficientnet_lite0", "--out", "data/features/again"], cwd=d)
    assert r.returncode == 0, r.stderr
    assert "reused 2 completed shard(s)" in r.stderr
    assert np.array_equal(np.load(d / "data/features/again/train.npy"), reference)
    assert np.array_equal(np.load(d / "data/features/again/test.npy"),
                          np.load(d / "data/features/efficientnet_lite0/test.npy"))
    assert not (d / "checkpoints/features/efficientnet_lite0").exists()
