"""The dual encoder's training options: image_pooling (attention, gem), text_tune_layers and
captions_per_image (the loss options are in test_contrastive_loss.py)."""
import pytest
import torch

from vlbench.models.contrastive import multi_positive_loss, same_image
from vlbench.models.pooling import AttentionPool, GeMPool
from vlbench.models.variants import build_variant, create_variant_model
from vlbench.training import Batches, make_step

BASE = {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0", "embed_dim": 32}
CAPTIONS = ["a dog runs on the grass", "two children play in the water", "a man rides a bike", "a red car"]


def test_attention_pooling_with_a_zero_query_is_the_mean():
    tokens = torch.randn(3, 49, 16)
    pool = AttentionPool(16)
    assert torch.allclose(pool(tokens), tokens.mean(1), atol=1e-6)  # starts as mean pooling
    with torch.no_grad():
        pool.query.normal_()
    assert not torch.allclose(pool(tokens), tokens.mean(1), atol=1e-3)
    model = create_variant_model(build_variant("t", {**BASE, "image_pooling": "attention"}), 16, 49)
    assert isinstance(model.image_pool, AttentionPool) and model.image_pool.query.requires_grad


def test_gem_with_p_one_is_the_mean_and_tends_to_the_max():
    tokens = torch.rand(3, 49, 16) * 6  # post-ReLU6 activations, like EfficientNet-Lite's grid
    pool = GeMPool()
    assert pool.p.item() == 3.0 and pool.p.requires_grad
    with torch.no_grad():
        pool.p.fill_(1.0)
    assert torch.allclose(pool(tokens), tokens.mean(1), atol=1e-5)
    with torch.no_grad():
        pool.p.fill_(60.0)
    assert torch.allclose(pool(tokens), tokens.amax(1), rtol=0.1)


def test_default_pooling_keeps_the_state_dict():
    model = create_variant_model(build_variant("t", BASE), 16, 49)
    assert not any(k.startswith("image_pool") for k in model.state_dict())  # old checkpoints load as before


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_only_the_top_layers_are_tuned(tuning, tmp_path):
    from vlbench.models.trained import load_trained, save_trained

    raw = {**BASE, "text_tuning": tuning, "text_tune_layers": 2, "lora": {"r": 4, "alpha": 8}}
    model = create_variant_model(build_variant("t", raw), 16, 4)
    model.train()
    layers = model.text_model.get_base_model().encoder.layer if tuning == "lora" else model.text_model.encoder.layer
    assert [layer.training for layer in layers] == [False] * 4 + [True] * 2  # the frozen ones without dropout
    bottom = []
    layers[3].register_forward_hook(lambda module, args, out: bottom.append(out[0] if isinstance(out, tuple) else out))
    tokens, mask = model.text_tokens(CAPTIONS, "cpu")
    model.loss(torch.rand(4, 4, 16), model.pool_text(tokens, mask)).backward()
    assert bottom[0].grad_fn is None and not bottom[0].requires_grad  # no autograd below the tuned layers
    got_grad = {name for name, p in model.text_model.named_parameters() if p.grad is not None}
    assert got_grad and all(".layer.4." in n or ".layer.5." in n for n in got_grad)
    if tuning == "full":  # every weight of the top two layers, nothing else
        assert got_grad == {n for n, _ in model.text_model.named_parameters() if ".layer.4." in n or ".layer.5." in n}
    else:
        assert all("lora_" in n for n in got_grad) and any(".layer.4." in n for n in got_grad)
    # the checkpoint holds the tuned layers only, and reloads to the same text embeddings
    saved = [k for k in model.trainable_state_dict() if k.startswith("text_model.")]
    assert saved and all(".layer.4." in k or ".layer.5." in k for k in saved)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.startswith("text_model."):
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    save_trained(model, tmp_path, "t", raw, {"image_dim": 16, "n_grid": 4})
    again, _, _ = load_trained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(model.text_features(CAPTIONS, "cpu"), again.text_features(CAPTIONS, "cpu"), atol=1e-5)


def test_top_layer_tuning_from_cached_frozen_layers_equals_the_whole_encoder():
    """text_tune_layers with full tuning: the frozen layers' output computed once per caption
    (TunedTextCache), then only the top layers per step, gives the whole encoder's features and
    the same gradients on the tuned layers."""
    from vlbench.training import TunedTextCache

    raw = {**BASE, "text_tuning": "full", "text_tune_layers": 2}
    captions = [CAPTIONS[:2], CAPTIONS[2:], ["a dog"]]
    model = create_variant_model(build_variant("t", raw), 16, 4)
    assert TunedTextCache.works_for(model, CAPTIONS, "cpu")
    cache = TunedTextCache(model, captions, "cpu")
    assert cache.states.dtype == torch.float16 and cache.states.shape[:2] == (5, model.cfg.max_text_len)
    model.eval()  # dropout off, so the two paths can be compared exactly
    idx, cap_idx = [0, 1, 2], [1, 0, 0]
    texts = [captions[i][j] for i, j in zip(idx, cap_idx)]
    images = torch.rand(3, 4, 16)
    grads = []
    for cached in (True, False):
        model.zero_grad(set_to_none=True)
        if cached:
            pooled, tokens, mask = cache.lookup(idx, cap_idx, "cpu")
            assert tokens.shape[1] == int(mask.sum(1).max())  # trimmed to the batch's longest caption
        else:
            tokens, mask = model.text_tokens(texts, "cpu")
            pooled = model.pool_text(tokens, mask)
        model.loss(images, pooled).backward()
        grads.append({n: p.grad.clone() for n, p in model.text_model.named_parameters() if p.grad is not None})
        features = pooled.detach() if cached else features
    assert grads[0].keys() == grads[1].keys() and all(".layer.4." in n or ".layer.5." in n for n in grads[0])
    for n in grads[0]:  # the cache holds fp16: equal up to its rounding
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-3, rtol=1e-2), n
    assert torch.allclose(features, pooled.detach(), atol=1e-3)
    # a model without a tuned top (frozen text, or all layers tuned) has no cached path
    assert not TunedTextCache.works_for(create_variant_model(build_variant("t", BASE), 16, 4), CAPTIONS, "cpu")


def test_captions_per_image_draws_distinct_captions_of_each_image():
    captions = [[f"image {i} caption {j}" for j in range(5 if i % 4 else 1)] for i in range(10)]
    one = Batches(10, captions, 4, seed=0).sample()
    assert Batches(10, captions, 4, seed=0, captions_per_image=1).sample() == one  # k = 1: the draw of before
    idx, cap_idx = Batches(10, captions, 4, seed=0, captions_per_image=3).sample()
    assert sorted(set(idx)) == one[0]  # the same images...
    for i in set(idx):  # ...each with 3 distinct captions (all of them when it has fewer)
        drawn = [j for i2, j in zip(idx, cap_idx) if i2 == i]
        assert len(drawn) == len(set(drawn)) == min(3, len(captions[i]))


def test_make_step_tells_the_loss_which_pairs_show_one_image():
    class Grids:
        def batch(self, rows):
            return torch.stack([torch.full((4, 16), float(r)) / 10 for r in rows])

    cfg = build_variant("t", {**BASE, "loss": "multi_positive", "captions_per_image": 2, "dropout": 0.0})
    model = create_variant_model(cfg, 16, 4).eval()
    captions = [[f"photo {i}, caption {j}" for j in range(3)] for i in range(4)]
    idx, cap_idx = Batches(4, captions, 3, seed=0, captions_per_image=2).sample()
    with torch.no_grad():
        loss = make_step(model, cfg, captions, None, Grids(), "cpu")(idx, cap_idx)
        img = model.embed_images(Grids().batch(idx))
        txt = model.embed_text_features(model.text_features([captions[i][j] for i, j in zip(idx, cap_idx)], "cpu"))
        expected = multi_positive_loss(img, txt, model.scale(), same_image(torch.as_tensor(idx)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
