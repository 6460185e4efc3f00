import math

import pytest
import torch

from vlbench.metrics.retrieval import chance_recall, ranks, retrieval_metrics


def test_hand_computed_ranks_with_grouped_captions():
    # 3 images, 2 captions each: caption j belongs to image j // 2.
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor([
        # c0   c1   c2   c3   c4   c5
        [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],  # img0: its c1 is best            -> i2t rank 1
        [0.9, 0.0, 0.2, 0.3, 0.8, 0.0],  # img1: best own c3 (0.3), beaten by c0, c4 -> rank 3
        [0.0, 0.0, 0.0, 0.0, 0.1, 0.5],  # img2: c5 best                   -> rank 1
    ])
    i2t, t2i = ranks(sim, owner)
    assert i2t.tolist() == [1, 3, 1]
    # t2i: column-wise rank of the true image.
    # c0 (img0: 0.1 vs 0.9 img1) -> 2; c1 -> 1; c2 (img1 0.2 vs 0.8 img0) -> 2; c3 -> 1; c4 (img2 0.1 vs 0.8) -> 2; c5 -> 1
    assert t2i.tolist() == [2, 1, 2, 1, 2, 1]
    m = retrieval_metrics(sim, owner, ks=(1, 2))
    assert m["i2t_R@1"] == pytest.approx(200 / 3)
    assert m["i2t_R@2"] == pytest.approx(200 / 3)
    assert m["t2i_R@1"] == pytest.approx(50)
    assert m["t2i_R@2"] == pytest.approx(100)
    assert m["i2t_median_rank"] == 1 and m["t2i_mean_rank"] == pytest.approx(1.5)


def test_grouping_pitfall_any_caption_is_a_hit():
    """The classic bug treats caption i as the only match of image i (diagonal of a square matrix).
    Here every image's top caption is its own second caption: correct R@1 is 100%."""
    owner = torch.tensor([0, 0, 1, 1])
    sim = torch.tensor([[0.2, 0.9, 0.1, 0.0], [0.0, 0.1, 0.3, 0.8]])
    m = retrieval_metrics(sim, owner, ks=(1,))
    assert m["i2t_R@1"] == 100.0
    # the same scores with the two images' captions swapped: each image's own captions are now beaten by the
    # other's two (0.9 and 0.2 above 0.1; 0.8 and 0.3 above 0.1), so the grouping, not the scores, decides
    swapped = torch.tensor([1, 1, 0, 0])
    assert ranks(sim, swapped)[0].tolist() == [3, 3]
    assert retrieval_metrics(sim, swapped, ks=(1,))["i2t_R@1"] == 0.0


def test_ties_and_caption_without_image_check():
    owner = torch.tensor([0, 1])
    sim = torch.ones(2, 2)
    i2t, t2i = ranks(sim, owner)
    assert i2t.tolist() == [1, 1] and t2i.tolist() == [1, 1]
    with pytest.raises(ValueError):
        ranks(torch.ones(3, 2), owner)  # image 2 has no caption


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(37, 37 * 5, generator=g)
    owner = torch.arange(37).repeat_interleave(5)
    a = ranks(sim, owner, chunk=4096)
    b = ranks(sim, owner, chunk=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_chance_matches_random_scores():
    n, per = 50, 5
    chance = chance_recall(n, per, ks=(1, 5))
    assert chance["t2i_R@1"] == pytest.approx(2.0)
    assert chance["i2t_R@1"] == pytest.approx(per / (n * per) * 100)
    g = torch.Generator().manual_seed(1)
    owner = torch.arange(n).repeat_interleave(per)
    trials = [retrieval_metrics(torch.rand(n, n * per, generator=g), owner, ks=(5,))["i2t_R@5"] for _ in range(200)]
    assert sum(trials) / len(trials) == pytest.approx(chance["i2t_R@5"], abs=1.5)
    assert chance["i2t_R@5"] == pytest.approx((1 - math.comb(245, 5) / math.comb(250, 5)) * 100)
