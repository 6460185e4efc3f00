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


class CountingGrids:
    """Cached grids that record which rows each batch loaded."""

    def __init__(self, grid):
        self.grid, self.loaded = grid, []

    def batch(self, rows):
        self.loaded.append(list(rows))
        return self.grid[list(rows)]


@pytest.mark.parametrize("model_name, options", [("grid_transformer", {}),
                                                 ("vision_prefix", {"prefix_hidden": 32, "prefix_length": 3}),
                                                 ("cross_attention_lm", {"every_n_layers": 1})])
def test_all_encodes_each_image_once_with_the_loss_of_repeated_images(model_name, options, batch, monkeypatch):
    """caption_sampling: all puts an image in the batch once per caption; its grid is loaded and
    encoded once, and the loss and its gradients are those of the image repeated per caption."""
    import torch

    from test_gpt2_path import tiny_gpt2
    from conftest import TINY_GRID
    from vlbench.models import registry
    from vlbench.models.tokenizers import Vocabulary
    from vlbench.models.variants import create_variant_model
    from vlbench.training import make_step

    monkeypatch.setitem(registry.ONLINE["lm"], "hf/", lambda repo: tiny_gpt2())
    grid, texts = batch
    captions = [[texts[i], texts[(i + 1) % len(texts)], texts[(i + 5) % len(texts)]] for i in range(len(texts))]
    raw = {"family": "captioning", "model": model_name, "image_encoder": "efficientnet_lite0", "caption_sampling": "all",
           **(TINY_GRID if model_name == "grid_transformer" else {"language_model": "hf/gpt2"}), **options}
    cfg = build_variant("t", raw)
    torch.manual_seed(0)
    model = create_variant_model(cfg, grid.shape[2], grid.shape[1], Vocabulary.build(texts).itos).eval()
    if model_name == "cross_attention_lm":
        with torch.no_grad():
            for block in model.blocks:
                block.gate.fill_(0.5)  # let the image in, so its gradients are not zero
    idx, cap_idx = Batches(len(captions), captions, 4, seed=1, caption_sampling="all").sample()
    assert len(idx) == 12 and len(set(idx)) == 4
    inputs = CountingGrids(grid)

    def loss_and_grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    shared, shared_grads = loss_and_grads(make_step(model, cfg, captions, None, inputs, "cpu")(idx, cap_idx))
    assert inputs.loaded == [sorted(set(idx))]
    repeated, repeated_grads = loss_and_grads(model.loss(grid[idx], [captions[i][j] for i, j in zip(idx, cap_idx)]))
    assert shared == pytest.approx(repeated, rel=1e-5)
    assert len(shared_grads) == len(repeated_grads) > 0
    for a, b in zip(shared_grads, repeated_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_label_smoothing_is_the_mixed_target_cross_entropy(batch):
    """label_smoothing e: (1 - e) x the reference word's loss + e x the mean loss over the vocabulary,
    over the caption's tokens (padding excluded); e = 0 is plain cross-entropy."""
    import torch

    from conftest import TINY_GRID
    from vlbench.models.tokenizers import PAD, Vocabulary, pad_sequences
    from vlbench.models.variants import create_variant_model

    grid, texts = batch
    raw = {"family": "captioning", "model": "grid_transformer", "image_encoder": "efficientnet_lite0", **TINY_GRID}
    losses = {}
    for e in (0.0, 0.2):
        torch.manual_seed(0)
        cfg = build_variant("t", {**raw, "label_smoothing": e})
        model = create_variant_model(cfg, grid.shape[2], grid.shape[1], Vocabulary.build(texts).itos).eval()
        losses[e] = model.loss(grid[:4], texts[:4]).item()
    ids = pad_sequences([model.vocab.encode(c, model.cfg.max_len) for c in texts[:4]], PAD)
    with torch.no_grad():
        logp = model.logits(model.encode(grid[:4]), ids[:, :-1]).log_softmax(-1)
    target, keep = ids[:, 1:], ids[:, 1:] != PAD
    nll = -logp.gather(2, target[..., None]).squeeze(2)[keep].mean().item()
    uniform = -logp.mean(-1)[keep].mean().item()
    assert losses[0.0] == pytest.approx(nll, rel=1e-5)
    assert losses[0.2] == pytest.approx(0.8 * nll + 0.2 * uniform, rel=1e-5)
    with pytest.raises(ParamError, match=r"label_smoothing: must be in \[0.0, 0.5\]"):
        build_variant("t", {**raw, "label_smoothing": 0.7})
