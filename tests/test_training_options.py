"""train.precision / train.grad_accum_steps: autocast that trains, fp16's loss scale in the checkpoint,
accumulation that gives the full batch's gradients, and a batch that cannot be split refused."""
import contextlib
import subprocess

import pandas as pd
import pytest
import torch
import yaml

from conftest import prepare_features, run_cli, tiny_params, train_gridcap
from vlbench.models.variants import build_variant, create_variant_model
from vlbench.training import accumulate, amp_dtype, native_bf16

STEPS = 8


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = tiny_params(n_images=30, steps=STEPS)
    params["train"]["checkpoint_every"] = 0
    return prepare_features(tmp_path_factory.mktemp("options"), params)


def train(d, tag: str, fault: str | None = None, **train_params) -> subprocess.CompletedProcess:
    """The train stage with ``train_params`` overriding params.yaml's `train` section."""
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["train"].update(train_params)
    (d / f"{tag}.yaml").write_text(yaml.safe_dump(params))
    return train_gridcap(d, tag, fault, params=f"{tag}.yaml")


def test_bf16_autocast_trains_on_cpu(project):
    for tag, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        r = train(project, tag, precision=precision)
        assert r.returncode == 0, r.stderr
    fp32, bf16 = (pd.read_csv(project / f"metrics/curves/{tag}.csv")["loss"] for tag in ("fp32", "bf16"))
    assert len(bf16) == STEPS and bf16.iloc[-1] < bf16.iloc[0]  # it learns
    assert bf16.iloc[0] == pytest.approx(fp32.iloc[0], rel=2e-2)  # the same loss, computed in bf16...
    assert bf16.tolist() != fp32.tolist()  # ...really in bf16: rounding shows in the curve


def test_fp16_loss_scale_goes_into_the_checkpoint(project):
    r = train(project, "fp16", fault="TERM@3", precision="fp16")
    assert r.returncode == 128 + 15, r.stderr
    state = torch.load(project / "checkpoints/fp16/last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # a live GradScaler, not fp32's empty state
    r = train(project, "fp16", precision="fp16")
    assert r.returncode == 0, r.stderr
    assert f"resuming gridcap from step 3/{STEPS}" in r.stderr
    assert len(pd.read_csv(project / "metrics/curves/fp16.csv")) == STEPS


def test_variant_precision_overrides_the_run_precision(project):
    """optim.precision bf16 under train.precision fp32 trains exactly as train.precision bf16 does,
    and a CPU without bf16 in hardware gets a warning saying so."""
    for tag, precision in (("run_bf16", "bf16"), ("variant_bf16", "fp32")):
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["train"]["precision"] = precision
        params["variants"]["gridcap"]["optim"]["precision"] = "bf16" if tag == "variant_bf16" else None
        (project / f"{tag}.yaml").write_text(yaml.safe_dump(params))
        r = train_gridcap(project, tag, params=f"{tag}.yaml")
        assert r.returncode == 0, r.stderr
        assert ("no bf16 in hardware" in r.stderr) == (not native_bf16(torch.device("cpu"))), r.stderr
    run, variant = (pd.read_csv(project / f"metrics/curves/{tag}.csv")["loss"] for tag in ("run_bf16", "variant_bf16"))
    assert variant.tolist() == run.tolist() and len(run) == STEPS


def test_amp_dtype(monkeypatch):
    import vlbench.training

    assert amp_dtype("fp32", torch.device("cuda")) is None
    assert amp_dtype("fp16", torch.device("cpu")) == torch.float16
    assert amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: given, emulated or not
    for native, expected in ((True, torch.bfloat16), (False, None)):  # auto: bf16 only where it is native
        monkeypatch.setattr(vlbench.training, "native_bf16", lambda device: native)
        assert amp_dtype("auto", torch.device("cpu")) == expected
        assert amp_dtype("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("micro_steps", [2, 3])
def test_accumulation_gives_the_full_batch_gradients(micro_steps):
    """A captioner's loss is a mean over caption tokens: with captions of one length (so every part
    weighs its tokens like the whole batch does) the parts' gradients add up to the full batch's."""
    cfg = build_variant("cap", {"family": "captioning", "model": "grid_transformer", "image_encoder": "efficientnet_lite0",
                                "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 4, "dropout": 0.0})
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "blue", "green", "circle", "square", "star"]
    torch.manual_seed(0)
    model = create_variant_model(cfg, image_dim=16, n_grid=4, vocab=vocab)
    grids = torch.randn(6, 4, 16)
    captions = ["a red circle", "a blue square", "a green star", "a red star", "a blue circle", "a green square"]

    def step(idx, cap_idx):
        return model(grids[idx], [captions[i] for i in idx])

    def gradients(parts: int):
        model.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = accumulate(step, list(range(6)), [0] * 6, parts, contextlib.nullcontext(), scaler, contextlib.nullcontext)
        return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full_loss, full = gradients(1)
    loss, accumulated = gradients(micro_steps)
    torch.testing.assert_close(loss, full_loss)
    assert accumulated.keys() == full.keys() and len(full) > 10
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-5, atol=1e-7, msg=k)


def test_batch_that_does_not_split_into_micro_steps_is_refused(tmp_path):
    params = tiny_params()
    params["train"]["grad_accum_steps"] = 3  # the variants' batch_size is 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = run_cli(["train", "--variant", "clip", "--features", "data/features/efficientnet_lite0"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("vlbench train: bad params: variants.clip.optim.batch_size: 8 does not "
                                                 "split into 1 process(es) x train.grad_accum_steps=3")
