"""longformer_minilm: MiniLM's weights in a sliding-window Longformer. A window covering the caption
reproduces MiniLM exactly (the weight copy is right); a small window is really sparse, and the
global [CLS] still sees the whole caption."""
import random

import pytest
import torch

from conftest import FLICKR8K
from vlbench.data import shapes
from vlbench.errors import ParamError
from vlbench.models import registry
from vlbench.models.dual_encoder import pool_tokens
from vlbench.models.longformer import longformer_from_minilm
from vlbench.models.variants import build_variant, create_variant_model

N_LAYERS = 6  # MiniLM-L6
SMALL_WINDOW = 4  # two neighbours each side: after 6 layers a token reaches 12 positions away


def shapes_captions(n: int = 12) -> list[str]:
    rng = random.Random(0)
    caps = []
    for _ in range(n // 4):
        background, objects = shapes.sample_scene(rng)
        caps += shapes.captions_for(background, objects, rng)[:4]
    return caps


def flickr8k_captions(n: int = 12) -> list[str]:
    token_file = FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt"
    if not token_file.is_file():
        pytest.skip(f"Flickr8k captions not found at {token_file}")
    with token_file.open() as f:
        return [f.readline().split("\t", 1)[1].strip() for _ in range(n)]


@pytest.fixture(scope="module")
def minilm():
    return registry.create_text_encoder("minilm_l6")


@pytest.fixture(scope="module")
def full_window():
    """Window 128 >= 2 x the longest caption here: every token sees every other one."""
    return longformer_from_minilm(attention_window=128, max_text_len=64)


@pytest.fixture(scope="module")
def small_window():
    return registry.create_text_encoder("longformer_minilm", attention_window=SMALL_WINDOW, max_text_len=64)


def hidden(encoder, captions: list[str], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    batch = encoder.tokenizer(captions, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return encoder.model(**batch, **kwargs).last_hidden_state, batch["attention_mask"].bool()


@pytest.mark.parametrize("source", [shapes_captions, flickr8k_captions], ids=["shapes", "flickr8k"])
def test_window_covering_the_caption_reproduces_minilm(source, minilm, full_window):
    captions = source()
    expected, mask = hidden(minilm, captions)
    got, _ = hidden(full_window, captions)
    assert got.shape == expected.shape  # Longformer pads to the window internally and un-pads its output
    assert torch.allclose(got[mask], expected[mask], atol=1e-4), (got - expected)[mask].abs().max()


def test_small_window_is_sparse_and_global_cls_sees_everything(minilm, small_window):
    caption = max(shapes_captions(), key=len)
    batch = small_window.tokenizer([caption], return_tensors="pt")
    far = batch["input_ids"].shape[1] - 2  # the last word, just before [SEP]
    reach = N_LAYERS * SMALL_WINDOW // 2
    assert far > reach, f"caption too short for the test: {caption!r}"

    expected, _ = hidden(minilm, [caption])
    got, _ = hidden(small_window, [caption])
    assert (got[0, reach:far] - expected[0, reach:far]).abs().max() > 0.05  # local attention changes them

    ids = batch["input_ids"].clone()
    square, circle = small_window.tokenizer.convert_tokens_to_ids(["square", "circle"])
    ids[0, far] = circle if ids[0, far] != circle else square
    pair = {"input_ids": torch.cat([batch["input_ids"], ids]), "attention_mask": batch["attention_mask"].repeat(2, 1)}
    no_global = torch.zeros_like(pair["input_ids"])
    with torch.no_grad():
        cls_global = small_window.model(**pair).last_hidden_state[:, 0]
        cls_local = small_window.model(**pair, global_attention_mask=no_global).last_hidden_state[:, 0]
    assert torch.allclose(cls_local[0], cls_local[1], atol=1e-6)  # out of the window's reach...
    assert (cls_global[0] - cls_global[1]).abs().max() > 1e-3  # ...but global attention sees it


def test_texts_longer_than_minilm_positions():
    """Past MiniLM's 512 positions the table repeats them; the output keeps the input's length."""
    long = longformer_from_minilm(attention_window=16, max_text_len=600)
    ids = torch.randint(1000, 2000, (1, 600), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = long.tokenizer.cls_token_id
    with torch.no_grad():
        out = long.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == (1, 600, 384) and torch.isfinite(out).all()


def test_hub_longformer_goes_through_the_generic_loader(tmp_path, minilm, full_window):
    """A LongformerModel saved in hub layout loads through `hf/<repo>` and DualEncoder pools it;
    its window covers the captions, so the features are MiniLM's."""
    full_window.model.save_pretrained(tmp_path)
    full_window.tokenizer.save_pretrained(tmp_path)
    raw = {"model": "dual_encoder", "family": "alignment", "image_encoder": "efficientnet_lite0",
           "text_encoder": f"hf/{tmp_path}", "embed_dim": 32}
    model = create_variant_model(build_variant("t", raw), image_dim=1280, n_grid=4).eval()
    captions = shapes_captions()
    with torch.no_grad():
        feats = model.text_features(captions, "cpu")
    expected, mask = hidden(minilm, captions)
    assert torch.allclose(feats, pool_tokens(expected, mask, "mean"), atol=1e-4)


@pytest.mark.parametrize("window", [0, -2, 7])
def test_attention_window_must_be_even_and_positive(window):
    raw = {"model": "dual_encoder", "family": "alignment", "image_encoder": "efficientnet_lite0",
           "text_encoder": "longformer_minilm", "attention_window": window}
    with pytest.raises(ParamError, match=r"^variants\.t\.attention_window: must be even and > 0"):
        build_variant("t", raw)


def test_build_model_uses_the_configured_window():
    raw = {"model": "dual_encoder", "family": "alignment", "image_encoder": "efficientnet_lite0",
           "text_encoder": "longformer_minilm", "attention_window": 6, "embed_dim": 32}
    model = create_variant_model(build_variant("t", raw), image_dim=1280, n_grid=4)
    assert model.text_model.config.attention_window == [6] * N_LAYERS
