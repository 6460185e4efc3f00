"""The symmetric InfoNCE loss and the learnable temperature on hand-computed cases."""
import math

import pytest
import torch

from vlbench.models.dual_encoder import contrastive_loss
from vlbench.models.variants import build_variant, create_variant_model


def test_matched_orthogonal_pairs():
    # logits = I: each row/column is [1, 0] with the target on the 1 -> -log(e / (e + 1)) = log(1 + 1/e)
    eye = torch.eye(2)
    assert contrastive_loss(eye, eye, torch.tensor(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_asymmetric_case_averages_both_directions():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both captions look like image 0
    # logits = img @ txt.T = [[1, 1], [0, 0]]
    # image->text: row 0 [1, 1] target 0 -> log 2; row 1 [0, 0] target 1 -> log 2        => mean log 2
    # text->image: columns as rows [1, 0] target 0 -> log(1 + 1/e); [1, 0] target 1 -> log(1 + e)
    i2t = math.log(2)
    t2i = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert contrastive_loss(img, txt, torch.tensor(1.0)).item() == pytest.approx((i2t + t2i) / 2)


def test_temperature_scales_logits_and_is_clamped():
    eye = torch.eye(3)
    # scale 10: each row [10, 0, 0] target first -> log(1 + 2 e^-10)
    expected = math.log(1 + 2 * math.exp(-10))
    assert contrastive_loss(eye, eye, torch.tensor(10.0)).item() == pytest.approx(expected, rel=1e-3)  # float32
    cfg = build_variant("t", {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                              "init_temperature": 0.07})
    model = create_variant_model(cfg, 8, 1)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # e^10 >> 100
    assert model.scale().item() == 100.0
    model.scale().backward()  # clamped: no gradient pushes the temperature further down
    assert model.logit_scale.grad.item() == 0.0
