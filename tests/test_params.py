"""Bad params.yaml edits: each must fail fast with one line that names the key."""
import copy

import pytest
import torch
import yaml

from conftest import run_cli, tiny_params
from vlbench.errors import ParamError
from vlbench.validation import validate_all


def edit(path: str, value):
    def apply(p):
        keys = path.split(".")
        d = p
        for k in keys[:-1]:
            d = d[k]
        if value is DELETE:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
        return p

    return apply


DELETE = object()

BAD_EDITS = [
    ("data.name", edit("data.name", "imagenet")),
    ("data.name", edit("data.name", DELETE)),
    ("data.max_broken_fraction", edit("data.max_broken_fraction", -0.1)),  # data.root is optional: it downloads
    ("data.root", lambda p: edit("data.root", "/no/such/folder")(edit("data.name", "flickr8k")(p))),
    ("data.shapes.n_images", edit("data.shapes.n_images", 0)),
    ("data.shapes.image_size", edit("data.shapes.image_size", "big")),
    ("split.test_size", edit("split.test_size", -5)),
    ("features.batch_size", edit("features.batch_size", 0)),
    ("features.backbones[0]", edit("features.backbones", ["no_such_net"])),
    ("train.device", edit("train.device", "tpu")),
    ("train.seed", edit("train.seed", 1.5)),
    ("evaluate.max_images", edit("evaluate.max_images", -1)),
    ("train.checkpoint_every", edit("train.checkpoint_every", -10)),
    ("train.precision", edit("train.precision", "fp8")),
    ("train.compile", edit("train.compile", "yes")),
    ("train.grad_accum_steps", edit("train.grad_accum_steps", 0)),
    ("train.grad_accum_steps", edit("train.grad_accum_steps", 1.5)),
    ("train.eval_every", edit("train.eval_every", -1)),
    ("train.eval_every", edit("train.eval_every", "often")),
    ("train.select_on", edit("train.select_on", "cider")),
    ("train.patience", edit("train.patience", -2)),
    ("train.patience", lambda p: edit("train.patience", 3)(edit("train.eval_every", 0)(p))),  # nothing to count
    ("train.dev_images", edit("train.dev_images", -5)),
    ("variants", edit("variants", {})),
    ("variants.clip.model", edit("variants.clip.model", "transformer9000")),
    ("variants.clip.model", edit("variants.clip.model", DELETE)),
    ("variants.clip.image_encoder", edit("variants.clip.image_encoder", DELETE)),
    ("variants.clip.image_encoder", edit("variants.clip.image_encoder", "timm/resnet50")),  # not a cached backbone
    ("variants.clip.text_encoder", edit("variants.clip.text_encoder", "bert")),
    ("variants.clip.optim.lr", edit("variants.clip.optim.lr", 0)),
    ("variants.clip.optim.lr", edit("variants.clip.optim.lr", -1e-3)),
    ("variants.clip.optim.lr", edit("variants.clip.optim.lr", "fast")),
    ("variants.clip.optim.batch_size", edit("variants.clip.optim.batch_size", 0)),
    ("variants.clip.optim.steps", edit("variants.clip.optim.steps", "10")),
    ("variants.clip.optim.ema_decay", edit("variants.clip.optim.ema_decay", 1.0)),
    ("variants.clip.text_pooling", edit("variants.clip.text_pooling", "max")),
    ("variants.clip.text_tuning", edit("variants.clip.text_tuning", True)),
    ("variants.clip.lora.r", edit("variants.clip.lora", {"r": 0})),
    ("variants.clip.lora.target_modules", edit("variants.clip.lora", {"target_modules": []})),
    ("variants.clip.family", edit("variants.clip.family", "captioning")),
    ("variants.clip.dropout", edit("variants.clip.dropout", 1.5)),
    ("variants.clip.embed_size", edit("variants.clip.embed_size", 128)),  # typo of embed_dim
    ("features.image_size", edit("features.image_size", "big")),  # a number or native
    ("features.image_size", edit("features.image_size", 0)),
    ("variants.clip.image_pooling", edit("variants.clip.image_pooling", "max")),
    ("variants.clip.loss", edit("variants.clip.loss", "triplet")),
    ("variants.clip.captions_per_image", edit("variants.clip.captions_per_image", 0)),
    ("variants.clip.captions_per_image", edit("variants.clip.captions_per_image", 3)),  # false negatives under infonce
    ("variants.clip.margin", lambda p: edit("variants.clip.margin", 0)(edit("variants.clip.loss", "vse_max_violation")(p))),
    ("variants.clip.hard_negative_beta", edit("variants.clip.hard_negative_beta", -0.5)),
    ("variants.clip.hard_negative_beta",
     lambda p: edit("variants.clip.hard_negative_beta", 0.5)(edit("variants.clip.loss", "vse_max_violation")(p))),
    ("variants.clip.text_tune_layers", edit("variants.clip.text_tune_layers", 2)),  # the text encoder is frozen
    ("variants.clip.text_tune_layers", lambda p: edit("variants.clip.text_tune_layers", -1)(edit("variants.clip.text_tuning", "full")(p))),
    ("variants.clip.text_tune_layers", lambda p: edit("variants.clip.text_tune_layers", 7)(edit("variants.clip.text_tuning", "lora")(p))),
    ("variants.gridcap.heads", edit("variants.gridcap.heads", 5)),  # 64 not divisible by 5
    ("variants.gridcap.decoding.strategy", edit("variants.gridcap.decoding", {"strategy": "topk"})),
    ("variants.gridcap.decoding.top_p", edit("variants.gridcap.decoding", {"top_p": 0})),
    ("colours", edit("colours", 3)),  # unknown section
    ("transfer.datasets.coco.root", edit("transfer", {"datasets": {"coco": {"name": "coco", "root": "/no/such/copy"}}})),
    ("transfer.datasets.coco.name", edit("transfer", {"datasets": {"coco": {"name": "imagenet", "root": "."}}})),
    ("transfer.datasets.a b", edit("transfer", {"datasets": {"a b": {"name": "coco", "root": "."}}})),
    ("transfer.datasets.coco.test_size", edit("transfer", {"datasets": {"coco": {"name": "coco", "root": ".", "test_size": 0}}})),
]


@pytest.mark.parametrize("key,apply", BAD_EDITS, ids=[f"{i}-{k}" for i, (k, _) in enumerate(BAD_EDITS)])
def test_bad_edit_names_the_key(key, apply):
    params = apply(copy.deepcopy(tiny_params()))
    with pytest.raises(ParamError) as e:
        validate_all(params)
    assert str(e.value).startswith(key + ":"), str(e.value)
    assert "\n" not in str(e.value)


def test_default_params_are_valid():
    from conftest import ROOT

    validate_all(yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_cli_exits_2_with_one_line_before_any_work(tmp_path):
    params = tiny_params()
    params["variants"]["clip"]["optim"]["lr"] = -0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # the pipeline's first stage (dvc.yaml `check`), and the stage that reads the variant
    r = run_cli(["check", "--stamp", "data/checked"], cwd=tmp_path)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1] == "vlbench check: bad params: variants.clip.optim.lr: must be > 0, got -0.1"
    assert not (tmp_path / "data").exists()  # nothing half-written
    r = run_cli(["train", "--variant", "clip", "--features", "data/features/x"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "vlbench train: bad params: variants.clip.optim.lr: must be > 0, got -0.1"
    assert not (tmp_path / "models").exists()


def test_cli_unknown_variant(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    r = run_cli(["train", "--variant", "nope", "--features", "x"], cwd=tmp_path)
    assert r.returncode == 2
    assert "variants.nope: unknown variant (known: clip, gridcap)" in r.stderr


@pytest.mark.parametrize("native", [True, False])
def test_check_warns_about_variants_under_emulated_bf16(monkeypatch, capsys, tmp_path, native):
    import vlbench.training
    from vlbench.commands import check

    params = tiny_params()
    params["train"]["precision"] = "bf16"
    params["variants"]["gridcap"]["optim"]["precision"] = "auto"  # bf16 only where native: never emulated
    monkeypatch.setattr(vlbench.training, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert check.emulated_bf16(params, cpu) == ([] if native else ["clip"])
    params["train"]["precision"] = "fp32"
    params["variants"]["gridcap"]["optim"]["precision"] = "bf16"  # a variant's own bf16 counts too
    assert check.emulated_bf16(params, cpu) == ([] if native else ["gridcap"])
    # the command: a warning, not an error (check still passes and stamps)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    check.main(["--params", str(path)])
    out = capsys.readouterr()
    assert "ok (2 variants)" in out.out
    assert ("gridcap would train many times slower" in out.err) == (not native), out.err


def test_check_names_why_a_gpu_has_no_bf16(monkeypatch, capsys, tmp_path):
    """device: cuda on a GPU without bf16: the warning says so, not that the CPU lacks AVX512-BF16."""
    from vlbench.commands import check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    params = tiny_params()
    params["train"].update(precision="bf16", device="cuda")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    check.main(["--params", str(path)])
    err = capsys.readouterr().err
    assert "but this GPU has no bf16: clip, gridcap would train" in err, err
    assert "AVX512" not in err
