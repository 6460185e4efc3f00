"""Decoding internals: the grid transformer's KV cache against full re-decoding, 2D position
encodings, and the cross-attention LM's zero-gate start and save/load."""
import pytest
import torch

from vlbench.config import DecodingConfig
from vlbench.models.decoding import CachedDecoding, FullDecoding
from vlbench.models.positions import apply_rope_2d, rope_2d_tables, sincos_2d
from vlbench.models.tokenizers import BOS
from vlbench.models.variants import build_variant

DECODINGS = {
    "greedy": DecodingConfig(strategy="greedy", max_len=20),
    "beam": DecodingConfig(strategy="beam", beam_size=3, max_len=20),
    "nucleus": DecodingConfig(strategy="nucleus", top_p=0.9, temperature=1.5, max_len=20),
}


@pytest.mark.parametrize("strategy", sorted(DECODINGS))
def test_kv_cache_gives_the_same_captions(strategy, trained_grid_captioner):
    model, grid = trained_grid_captioner
    dec = DECODINGS[strategy]
    cached = model.generate(grid, dec, generator=torch.Generator().manual_seed(3), use_cache=True)
    full = model.generate(grid, dec, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert cached == full
    assert any(len(c.split()) > 2 for c in cached)  # real captions, not empty strings agreeing


def test_kv_cache_logits_match_full_decoding_step_by_step(trained_grid_captioner):
    model, grid = trained_grid_captioner
    torch.manual_seed(0)
    ids = torch.cat([torch.full((len(grid), 1), BOS), torch.randint(4, len(model.vocab), (len(grid), 9))], 1)
    with torch.no_grad():
        memory = model.encode(grid)
        cached, full = CachedDecoding(model, memory), FullDecoding(model, memory)
        for t in range(1, ids.shape[1] + 1):
            a, b = cached.logp(ids[:, :t]), full.logp(ids[:, :t])
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (t, (a - b).abs().max())
        # beam search reorders rows: the cache must follow them
        rows = torch.randperm(len(grid))
        cached.reorder(rows), full.reorder(rows)
        nxt = torch.cat([ids[rows], ids[rows][:, -1:]], 1)
        assert torch.allclose(cached.logp(nxt), full.logp(nxt), atol=1e-4, rtol=1e-4)


def test_rope_2d_scores_depend_only_on_relative_offsets():
    side, head_dim = 5, 16
    cos, sin = rope_2d_tables(side, head_dim)
    torch.manual_seed(0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rq = apply_rope_2d(q.expand(side * side, -1), cos, sin)
    rk = apply_rope_2d(k.expand(side * side, -1), cos, sin)
    scores = rq @ rk.T  # [query token, key token], tokens row-major

    def at(r, c):
        return r * side + c

    # the same (row, col) offset from different places scores the same
    assert torch.allclose(scores[at(0, 0), at(1, 2)], scores[at(2, 1), at(3, 3)], atol=1e-5)
    assert torch.allclose(scores[at(4, 4), at(3, 1)], scores[at(1, 3), at(0, 0)], atol=1e-5)
    # other offsets differ, and the rotation keeps norms
    assert not torch.allclose(scores[at(0, 0), at(1, 2)], scores[at(0, 0), at(2, 1)], atol=1e-3)
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(side * side), atol=1e-5)


def test_sincos_2d_codes_rows_and_columns_separately():
    side, dim = 4, 16
    pos = sincos_2d(side, dim)[0]
    assert pos.shape == (side * side, dim)
    row_half, col_half = pos[:, : dim // 2], pos[:, dim // 2 :]
    assert torch.equal(row_half[0 * side + 1], row_half[0 * side + 3])  # same row, other column
    assert torch.equal(col_half[1 * side + 2], col_half[3 * side + 2])  # same column, other row
    assert len({tuple(p.tolist()) for p in pos}) == side * side  # every token distinct


@pytest.fixture(scope="module")
def lm():
    from vlbench.models import registry

    return registry.create_language_model("smollm2_135m")


def test_cross_attention_lm_starts_as_the_unchanged_lm_and_round_trips(lm, batch, tmp_path):
    from vlbench.models.cross_attention_lm import CrossAttentionLMCaptioner
    from vlbench.models.trained import load_trained, save_trained

    grid, captions = batch
    grid, captions = grid[:4], captions[:4]
    # the plain LM on "<bos> caption<eos>" (right-padded), before any block is attached
    tok = lm.tokenizer
    body = [tok(" " + c + tok.eos_token, add_special_tokens=False).input_ids for c in captions]
    n = max(map(len, body)) + 1
    ids = torch.tensor([[tok.bos_token_id, *b] + [tok.pad_token_id] * (n - 1 - len(b)) for b in body])
    mask = torch.tensor([[1] * (len(b) + 1) + [0] * (n - 1 - len(b)) for b in body])
    with torch.no_grad():
        plain = lm.model(input_ids=ids, attention_mask=mask).logits

    raw = {"model": "cross_attention_lm", "family": "captioning", "image_encoder": "efficientnet_lite0", "every_n_layers": 10}
    torch.manual_seed(0)
    model = CrossAttentionLMCaptioner(build_variant("t", raw), grid.shape[2], grid.shape[1], lm).eval()
    assert len(model.blocks) == 3  # before layers 0, 10, 20 of 30
    got_ids, got_mask, labels = model.tokenize(captions, "cpu")
    assert torch.equal(got_ids, ids) and torch.equal(got_mask, mask)
    assert (labels[:, 0] == -100).all() and torch.equal(labels[:, 1:] != -100, mask[:, 1:].bool())  # caption tokens only
    with torch.no_grad():
        assert torch.equal(model.logits(grid, captions), plain)  # gate 0: exactly the LM's own output
        for block in model.blocks:
            block.gate.fill_(0.5)
        opened = model.logits(grid, captions)
    assert not torch.allclose(opened, plain, atol=1e-3)  # an open gate lets the image in

    saved = model.trainable_state_dict()
    assert saved and not any(k.startswith("lm.") for k in saved)
    assert "start" in saved  # the trained start embedding (initialised to the BOS embedding)
    save_trained(model, tmp_path, "t", raw, {"image_dim": grid.shape[2], "n_grid": grid.shape[1]})
    again, _, _ = load_trained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(again.logits(grid, captions), opened, atol=1e-5)
    # the reloaded model's greedy captions are the original's argmax decode by hand: 6 steps of the LM after
    # the trained start token, the image attended through the open gates, cut before EOS
    with torch.no_grad(), model.attending(model.vision(grid[:2])):
        embeds, ids = model.start.expand(2, -1, -1), torch.empty(2, 0, dtype=torch.long)
        for _ in range(6):
            nxt = model.lm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            embeds = torch.cat([embeds, model.lm.get_input_embeddings()(nxt)[:, None]], 1)
    eos = tok.eos_token_id
    by_hand = [tok.decode(row[: row.index(eos)] if eos in row else row).strip() for row in ids.tolist()]
    assert again.generate(grid[:2], DecodingConfig(strategy="greedy", max_len=6)) == by_hand


def test_gpt2_bpe_vocabulary_round_trips_any_text_and_reloads(tmp_path, batch):
    from vlbench.models.tokenizers import EOS, UNK, BPEVocabulary
    from vlbench.models.trained import load_trained, save_trained
    from vlbench.models.variants import create_variant_model

    vocab = BPEVocabulary()
    assert len(vocab) == 4 + 50257
    text = "A xylophonist plays near Zürich's lake."  # words no small caption vocabulary would hold
    ids = vocab.encode(text, 64)
    assert ids[0] == BOS and ids[-1] == EOS and all(i > UNK for i in ids[1:-1])
    assert vocab.decode(ids[1:]) == text
    assert len(vocab.encode(text, 5)) == 5  # truncated to max_len, BOS and EOS kept

    grid, _ = batch
    raw = {"family": "captioning", "model": "grid_transformer", "image_encoder": "efficientnet_lite0",
           "tokenizer": "gpt2_bpe", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 4}
    model = create_variant_model(build_variant("t", raw), grid.shape[2], grid.shape[1]).eval()
    save_trained(model, tmp_path, "t", raw, {"image_dim": grid.shape[2], "n_grid": grid.shape[1]})
    again, _, meta = load_trained(tmp_path)
    assert "vocab" not in meta  # nothing to store: the vocabulary is GPT-2's
    dec = DecodingConfig(strategy="greedy", max_len=6)
    assert again.generate(grid[:2], dec) == model.generate(grid[:2], dec)


def test_unknown_word_is_never_generated(trained_grid_captioner):
    """<unk> (which decode drops: "sitting on a ." for "sitting on a <unk>") is never generated:
    raising its logit above every word's changes no caption, no sample and no sample's log-probability."""
    from vlbench.models.tokenizers import UNK

    model, grid = trained_grid_captioner

    def outputs():
        captions = {s: model.generate(grid, dec, generator=torch.Generator().manual_seed(3)) for s, dec in DECODINGS.items()}
        with torch.no_grad():
            s = model.sample_with_logprobs(grid, 3, 12, torch.Generator().manual_seed(5))
        return captions, s

    plain, plain_samples = outputs()
    hook = model.out.register_forward_hook(lambda mod, args, out: out.index_add(
        -1, torch.tensor([UNK]), torch.full((*out.shape[:-1], 1), 50.0)))
    try:
        boosted, samples = outputs()
    finally:
        hook.remove()
    assert boosted == plain and any(len(c.split()) > 2 for c in plain["greedy"])
    assert torch.equal(samples.ids, plain_samples.ids) and not (samples.ids == UNK).any()
    torch.testing.assert_close(samples.logprobs, plain_samples.logprobs)
