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


# ---------------------------------------------------------------- loss: multi_positive, vse_max_violation, hard negatives

from vlbench.models.contrastive import (max_violation_loss, multi_positive_info_nce, multi_positive_loss,  # noqa: E402
                                        same_image)


def nll(target: float, *negatives: float) -> float:
    """-log(e^target / (e^target + sum e^negatives))"""
    return -math.log(math.exp(target) / (math.exp(target) + sum(math.exp(n) for n in negatives)))


def test_multi_positive_counts_no_caption_of_the_same_image_as_a_negative():
    # pairs 0 and 1 show image 0 (two captions), pair 2 image 1; scale 1
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    positives = same_image(torch.tensor([0, 0, 1]))
    # logits = [[1, .6, 0], [1, .6, 0], [0, .8, 1]]
    # image->caption rows: row 0 targets caption 0, caption 1 (same image) left out, caption 2 negative
    i2t = (nll(1, 0) + nll(0.6, 0) + nll(1, 0, 0.8)) / 3
    # caption->image (the columns): caption 0 [1, 1, 0] targets row 0, row 1 is the same image
    t2i = (nll(1, 0) + nll(0.6, 0.8) + nll(1, 0, 0)) / 3
    got = multi_positive_loss(img, txt, torch.tensor(1.0), positives).item()
    assert got == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # InfoNCE counts the other caption (and the repeated image) as negatives
    infonce = (nll(1, 0.6, 0) + nll(0.6, 1, 0) + nll(1, 0, 0.8) + nll(1, 1, 0) + nll(0.6, 0.6, 0.8) + nll(1, 0, 0)) / 6
    assert contrastive_loss(img, txt, torch.tensor(1.0)).item() == pytest.approx(infonce, rel=1e-6)
    assert got < infonce - 0.1


def test_multi_positive_with_one_caption_per_image_is_infonce():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    positives = same_image(torch.arange(6))  # six distinct images: the diagonal
    scale = torch.tensor(14.3)
    assert multi_positive_loss(img, txt, scale, positives).item() == pytest.approx(
        contrastive_loss(img, txt, scale).item(), rel=1e-6)


def test_spreading_the_target_over_repeated_rows_would_be_infonce():
    """Why multi_positive leaves the other positives out instead of spreading each row's target over
    them: with an image repeated in the batch, the spread targets give InfoNCE's loss exactly."""
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)[ids]  # the rows of one image embed alike
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    logits, positives = 10 * img @ txt.t(), same_image(ids).float()
    target = positives / positives.sum(1, keepdim=True)
    spread = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target.t())) / 2
    assert spread.item() == pytest.approx(contrastive_loss(img, txt, torch.tensor(10.0)).item(), rel=1e-6)


def test_hard_negative_weighting():
    logits = torch.tensor([[2.0, 1.0, 0.0]])  # the matched pair (first), negatives 1 and 0
    positives = torch.tensor([[True, False, False]])
    e = math.exp
    assert multi_positive_info_nce(logits, positives).item() == pytest.approx(nll(2, 1, 0), rel=1e-6)
    # beta = 1: weights e^s / (e^1 + e^0), times 2 negatives -> N = 2 (e^1 e^1 + e^0 e^0) / (e^1 + e^0)
    n_beta = 2 * (e(2) + 1) / (e(1) + 1)
    assert multi_positive_info_nce(logits, positives, beta=1.0).item() == pytest.approx(
        -math.log(e(2) / (e(2) + n_beta)), rel=1e-6)
    assert multi_positive_info_nce(logits, positives, beta=1.0) > multi_positive_info_nce(logits, positives)  # harder


def test_vse_max_violation_takes_the_hardest_negative_only():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.7], [0.2, 0.4, 0.7]])
    img, txt = torch.eye(3), sim.t()  # img @ txt.T = sim
    # pair 0: hardest caption .5, hardest image .3: no violation of margin .2
    # pair 1: hardest caption .7 -> .2 - .8 + .7 = .1; hardest image .5 -> 0
    # pair 2: hardest caption .4 -> 0; hardest image .7 -> .2 - .7 + .7 = .2
    assert max_violation_loss(img, txt, same_image(torch.arange(3)), 0.2).item() == pytest.approx(0.1, abs=1e-6)
    # pairs 1 and 2 show one image: each other's caption is no negative, and nothing violates
    assert max_violation_loss(img, txt, same_image(torch.tensor([0, 1, 1])), 0.2).item() == pytest.approx(0.0, abs=1e-7)


def test_the_model_applies_the_configured_loss():
    torch.manual_seed(0)
    grid, pooled = torch.rand(4, 3, 8), torch.randn(4, 384)  # pooled MiniLM features
    ids = torch.tensor([0, 0, 1, 2])
    base = {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0", "dropout": 0.0}
    losses = {}
    for loss in ("infonce", "multi_positive", "vse_max_violation"):
        torch.manual_seed(1)
        extra = {"captions_per_image": 2} if loss != "infonce" else {}
        model = create_variant_model(build_variant("t", {**base, "loss": loss, **extra}), 8, 3).eval()
        img, txt = model.embed_images(grid), model.embed_text_features(pooled)
        losses[loss] = model.loss(grid, pooled, image_ids=ids).item()
        if loss == "multi_positive":
            assert losses[loss] == pytest.approx(multi_positive_loss(img, txt, model.scale(), same_image(ids)).item())
        if loss == "vse_max_violation":
            assert losses[loss] == pytest.approx(max_violation_loss(img, txt, same_image(ids), 0.2).item())
            assert not model.logit_scale.requires_grad  # VSE++ has no temperature to learn
        if loss == "infonce":
            assert losses[loss] == pytest.approx(contrastive_loss(img, txt, model.scale()).item())
