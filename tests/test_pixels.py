"""End-to-end (pixel) variants: the image encoder is tuned, so they read images instead of the
features stage's cache, and their checkpoints hold what of the encoder was tuned."""
import json

import pytest
import yaml
from safetensors.torch import load_file

from conftest import assert_recalls_match_naive_reference, run_cli, tiny_params
from vlbench.errors import ParamError
from vlbench.models.variants import build_variant, create_variant_model
from vlbench.validation import validate_all

PIXEL = {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0", "image_size": 64,
         "image_tuning": "lora", "image_lora": {"r": 4, "alpha": 8, "target_modules": ["conv_pwl"]},
         "optim": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "log_every": 1}}


def test_image_tuning_modes_train_what_they_say():
    counts = {}
    for tuning in ("frozen", "lora", "top", "full"):
        cfg = build_variant("t", {**PIXEL, "image_tuning": tuning}, "pixel_variants")
        model = create_variant_model(cfg, 1280, 4, pixels=True)
        counts[tuning] = sum(p.numel() for p in model.image_encoder.parameters() if p.requires_grad)
        keys = model.trainable_state_dict().keys()
        encoder_keys = [k for k in keys if k.startswith("image_encoder.")]
        if tuning == "frozen":
            assert counts[tuning] == 0 and not encoder_keys
        elif tuning == "lora":
            assert encoder_keys and all("lora_" in k for k in encoder_keys)
        elif tuning == "top":  # EfficientNet's last stage (blocks.6) and head conv, nothing below
            top = tuple(f"image_encoder.backbone.{m}." for m in ("blocks.6", "conv_head", "bn2"))
            assert encoder_keys and all(k.startswith(top) for k in encoder_keys)
            assert all(p.requires_grad == k.startswith(top) for k, p in model.image_encoder.named_parameters(prefix="image_encoder"))
    assert 0 < counts["lora"] < counts["top"] < 0.5 * counts["full"]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "timm/resnet18"])
@pytest.mark.parametrize("stages", [1, 2])
def test_image_top_and_bottom_compute_the_whole_tower(name, stages):
    import torch

    from vlbench.models.components import timm_image_encoder
    from vlbench.models.registry import create_image_encoder

    enc = (timm_image_encoder(name[5:], pretrained=False) if name.startswith("timm/") else create_image_encoder(name)).eval()
    bottom, top = enc.split_top(stages)
    assert len(top) == stages + (2 if name.startswith("efficientnet") else 0)  # EfficientNet: + head conv and its norm
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        whole = enc(x)
        maps = bottom(x)
        split = top(maps).flatten(2).transpose(1, 2)
    assert maps.shape[1] != 3 and split.shape == whole.shape
    torch.testing.assert_close(split, whole)


def test_image_top_tuning_needs_a_cnn_with_a_stage_left_frozen():
    with pytest.raises(ParamError, match=r"^pixel_variants\.t\.image_tuning: top tunes a CNN"):
        build_variant("t", {**PIXEL, "image_encoder": "hf/google/vit-base-patch16-224", "image_tuning": "top"},
                      "pixel_variants")
    with pytest.raises(ParamError, match=r"^pixel_variants\.t\.image_tune_stages: 7, but efficientnet_lite0 has 7"):
        build_variant("t", {**PIXEL, "image_tuning": "top", "image_tune_stages": 7}, "pixel_variants")
    with pytest.raises(ParamError, match=r"^pixel_variants\.t\.image_tune_stages: needs image_tuning: top"):
        build_variant("t", {**PIXEL, "image_tune_stages": 2}, "pixel_variants")
    two = build_variant("t", {**PIXEL, "image_tuning": "top", "image_tune_stages": 2}, "pixel_variants")
    model = create_variant_model(two, 1280, 4, pixels=True)
    tuned = {k.split(".")[3] for k in model.trainable_state_dict() if k.startswith("image_encoder.backbone.blocks.")}
    assert tuned == {"5", "6"}


def test_image_tuning_on_cached_features_is_refused():
    params = tiny_params()
    params["variants"]["clip"]["image_tuning"] = "lora"
    with pytest.raises(ParamError, match=r"^variants\.clip\.image_tuning: .*pixel_variants"):
        validate_all(params)
    params = tiny_params()
    params["pixel_variants"] = {"clip": PIXEL}
    with pytest.raises(ParamError, match=r"^pixel_variants\.clip: the same name"):
        validate_all(params)


@pytest.fixture(scope="module")
def pixel_project(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixels")
    params = tiny_params(n_images=40)
    params["pixel_variants"] = {"clip_px": PIXEL, "clip_top": {**PIXEL, "image_tuning": "top"}}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    for args in (["download"], ["split"]):  # no features stage
        r = run_cli(args, cwd=d)
        assert r.returncode == 0, r.stderr[-2000:]
    for name in params["pixel_variants"]:
        r = run_cli(["train", "--variant", name], cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
        r = run_cli(["evaluate", "--variant", name], cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
    return d


def _reloaded(d, name: str):
    """The saved model of ``name`` (eval mode), its config, the test manifest, its images' pixels as
    the model takes them, every test caption and each caption's image row."""
    import pandas as pd
    import torch

    from vlbench.models.trained import load_trained
    from vlbench.runtime import load_image, to_tensor

    model, cfg, _ = load_trained(d / "models" / name)
    model.eval()
    test = pd.read_parquet(d / "data/splits/test.parquet")
    enc = model.image_encoder
    pixels = torch.stack([to_tensor(load_image(str(d / p), cfg.image_size), enc.mean, enc.std) for p in test["path"]])
    flat = [c for caps in test["captions"] for c in caps]
    owner = [i for i, caps in enumerate(test["captions"]) for _ in caps]
    return model, cfg, test, pixels, flat, owner


def test_pixel_variant_trains_and_evaluates_without_features(pixel_project):
    d = pixel_project
    assert not (d / "data/features").exists()
    meta = json.loads((d / "models/clip_px/config.json").read_text())
    assert meta["input"] == "pixels" and meta["image_size"] == 64
    saved = load_file(str(d / "models/clip_px/model.safetensors"))
    lora = [k for k in saved if k.startswith("image_encoder.")]
    assert lora and all("lora_" in k for k in lora)  # the frozen backbone is not duplicated into the checkpoint
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in lora)  # and training moved the adapters
    result = json.loads((d / "metrics/clip_px.json").read_text())
    assert result["images"] == 12
    # the recalls again, by a naive reference on the similarities of the saved model, recomputed here from
    # the test images' pixels through its tuned encoder
    import torch

    model, _, _, pixels, flat, owner = _reloaded(d, "clip_px")
    with torch.no_grad():
        image = model.embed_images(model.image_tokens(pixels))
        sim = (image @ model.embed_text_features(model.text_features(flat, "cpu")).T).tolist()
    assert_recalls_match_naive_reference(result["metrics"], sim, owner)
    assert "random_projection" in result


def test_pixel_variant_reloads_and_searches(pixel_project):
    from vlbench.models.trained import load_trained

    model, cfg, _ = load_trained(pixel_project / "models/clip_px")
    assert model.image_encoder is not None and cfg.image_tuning == "lora"
    r = run_cli(["search", "a red circle", "--variant", "clip_px", "--top", "2"], cwd=pixel_project)
    assert r.returncode == 0, r.stderr[-2000:]
    hits = [line.split("\t") for line in r.stdout.splitlines() if "\t" in line]
    assert len(hits) == 2 and all((pixel_project / p).is_file() for _, p in hits)


def test_test_time_flip_embeds_each_image_with_its_mirror_image(pixel_project):
    """``evaluate.test_time_flip``: the test metrics are those of the normalised mean of each test
    image's and its mirror image's embeddings, the result says so, and `vlbench search` ranks the
    images by those embeddings, as the evaluation did."""
    import torch

    d = pixel_project
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["evaluate"]["test_time_flip"] = True
    (d / "params_flip.yaml").write_text(yaml.safe_dump(params))
    r = run_cli(["evaluate", "--variant", "clip_px", "--params", "params_flip.yaml", "--metrics", "metrics_flip"], cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((d / "metrics_flip/clip_px.json").read_text())
    assert result["test_time_flip"] is True and json.loads((d / "metrics/clip_px.json").read_text())["test_time_flip"] is False
    from vlbench.stages.report import summarise

    assert "| clip_px (test-time flip) |" in summarise([result])  # the report says which embeddings it scored
    assert "test-time flip" not in summarise([json.loads((d / "metrics/clip_px.json").read_text())]).lower()
    model, _, test, pixels, flat, owner = _reloaded(d, "clip_px")
    with torch.no_grad():
        single = model.embed_images(model.image_tokens(pixels))
        image = torch.nn.functional.normalize(single + model.embed_images(model.image_tokens(pixels.flip(-1))), dim=-1)
        text = model.embed_text_features(model.text_features(flat, "cpu"))
    assert not torch.allclose(image, single, atol=1e-3)  # the mirror image moved the embeddings
    assert_recalls_match_naive_reference(result["metrics"], (image @ text.T).tolist(), owner)
    r = run_cli(["search", flat[0], "--variant", "clip_px", "--top", str(len(test)), "--metrics", "metrics_flip"], cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    by_path = dict(zip(test["path"], (image @ text[0]).tolist()))
    printed = [line.split("\t") for line in r.stdout.splitlines() if "\t" in line]
    assert len(printed) == len(test) and "mirror image" in r.stderr
    assert [float(score) for score, _ in printed] == pytest.approx([by_path[p] for _, p in printed], abs=1e-4)


def test_stage_and_variant_kind_must_agree(pixel_project):
    r = run_cli(["train", "--variant", "clip_px", "--features", "data/features/x"], cwd=pixel_project)
    assert r.returncode == 2 and "pixel variant reads images" in r.stderr


def test_image_top_tuning_trains_the_top_over_maps_computed_once(pixel_project, monkeypatch):
    """``image_tuning: top``: the checkpoint holds the tuned last stage (moved from ImageNet's
    weights) and nothing below; the frozen stages' maps the train stage computes once give the
    tokens the whole tower gives from pixels; the test metrics are those of the reloaded model's
    similarities, its tuned top included."""
    import torch

    from vlbench.inputs import FrozenBottom, Pixels
    from vlbench.models.registry import create_image_encoder

    d = pixel_project
    saved = load_file(str(d / "models/clip_top/model.safetensors"))
    encoder_keys = [k for k in saved if k.startswith("image_encoder.")]
    assert encoder_keys and all(k.startswith(("image_encoder.backbone.blocks.6.", "image_encoder.backbone.conv_head.",
                                              "image_encoder.backbone.bn2.")) for k in encoder_keys)
    pretrained = create_image_encoder("efficientnet_lite0").state_dict()
    head = "image_encoder.backbone.conv_head.weight"
    assert not torch.equal(saved[head], pretrained[head.removeprefix("image_encoder.")])  # training moved the top
    model, cfg, test, pixels, flat, owner = _reloaded(d, "clip_top")
    torch.testing.assert_close(model.image_encoder.backbone.conv_head.weight, saved[head])
    monkeypatch.chdir(d)  # the manifests' image paths are the project's
    maps = FrozenBottom(Pixels(d / "data/splits", "test", cfg.image_size, model.image_encoder), model, torch.device("cpu"), "test")
    with torch.no_grad():
        tokens = model.image_tokens(pixels)
        torch.testing.assert_close(model.image_tokens(maps.batch(list(range(len(maps))))), tokens, atol=2e-2, rtol=1e-2)
        sim = (model.embed_images(tokens) @ model.embed_text_features(model.text_features(flat, "cpu")).T).tolist()
    result = json.loads((d / "metrics/clip_top.json").read_text())
    assert_recalls_match_naive_reference(result["metrics"], sim, owner)
