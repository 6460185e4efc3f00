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
