"""`caption_sampling`: one random caption per sampled image, or all of them."""
import pytest

from vlbench.errors import ParamError
from vlbench.models.variants import build_variant
from vlbench.training import Batches

CAPTIONS = [[f"image {i} caption {j}" for j in range(3 + i % 3)] for i in range(10)]  # 3 to 5 captions each


def test_random_draws_one_caption_per_image():
    idx, cap_idx = Batches(10, CAPTIONS, 4, seed=0).sample()
    assert len(idx) == len(set(idx)) == 4
    assert all(0 <= j < len(CAPTIONS[i]) for i, j in zip(idx, cap_idx))


def test_all_gives_every_caption_of_the_same_images():
    random_idx, _ = Batches(10, CAPTIONS, 4, seed=0).sample()
    idx, cap_idx = Batches(10, CAPTIONS, 4, seed=0, caption_sampling="all").sample()
    assert sorted(set(idx)) == random_idx  # the same seeded choice of images
    pairs = sorted(zip(idx, cap_idx))
    assert pairs == [(i, j) for i in random_idx for j in range(len(CAPTIONS[i]))]


def test_caption_sampling_is_validated():
    raw = {"model": "grid_transformer", "family": "captioning", "image_encoder": "efficientnet_lite0"}
    assert build_variant("t", {**raw, "caption_sampling": "all"}).caption_sampling == "all"
    with pytest.raises(ParamError, match=r"^variants\.t\.caption_sampling: 'every' is not one of"):
        build_variant("t", {**raw, "caption_sampling": "every"})
