"""Self-critical sequence training (issue #14): the CIDEr-D reward against pycocoevalcap, the
mean-of-others baseline by hand, sampling with log-probabilities that carry gradients in every
captioner family, the scst params, and a toy task on which SCST raises dev CIDEr-D."""
import copy
import math
import dataclasses
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_GRID, tiny_params
from vlbench.errors import ParamError
from vlbench.metrics.cider_d import CiderD, cider_d, tokenize
from vlbench.metrics.sentence_bleu import sentence_bleu
from vlbench.scst import ScstTrainer, mean_of_others, scst_loss

WORDS = "a the dog cat red blue runs sits on grass ball man woman with plays in park".split()


def random_corpus(seed: int, images: int = 30):
    rng = random.Random(seed)
    refs = {i: [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 5))]
            for i in range(images)}
    hyps = {i: " ".join(rng.choices(WORDS, k=rng.randint(0, 12))) for i in range(images)}
    hyps[3] = refs[3][0]  # one exact match
    hyps[4] = refs[4][0] + " " + refs[4][0]  # one far too long
    return refs, hyps


# ------------------------------------------------------------------------------ CIDEr-D


def test_cider_d_equals_pycocoevalcap_cider_with_the_same_document_frequencies():
    """Already-tokenised text, document frequencies from the scored set's own references (what
    pycocoevalcap does): every per-image score is the same number."""
    from pycocoevalcap.cider.cider import Cider

    for seed in range(3):
        refs, hyps = random_corpus(seed)
        mean, per_image = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
        mine = CiderD(refs.values()).scores([hyps[k] for k in refs], [refs[k] for k in refs])
        np.testing.assert_allclose(mine, per_image, rtol=1e-12, atol=1e-12)
        assert cider_d(refs, hyps) == pytest.approx(100 * mean, rel=1e-12)


def test_cider_d_by_hand():
    corpus = [["a red circle"], ["two blue squares"], ["one green star"]]  # no n-gram shared between images
    c = CiderD(corpus)
    # identical to its only reference: every n-gram vector equal, cosine 1 for n = 1..4 (a 3-word
    # caption has no 4-gram: that cosine is 0), length penalty exp(0) = 1 -> 10 x (1 + 1 + 1 + 0) / 4
    assert c.score("a red circle", ["a red circle"]) == pytest.approx(7.5)
    assert c.score("two blue squares", ["a red circle"]) == 0.0
    # a caption whose every n-gram is in every image's references has idf 0 everywhere: CIDEr-D 0
    shared = CiderD([["a picture", "x"], ["a picture", "y"]])
    assert shared.score("a picture", ["a picture"]) == 0.0
    # clipping: repeating a matched word adds nothing; the length penalty (bigrams 0 vs 1) lowers it
    once = c.score("red", ["a red circle"])
    assert c.score("red red red", ["a red circle"]) < c.score("red circle", ["a red circle"])
    assert 0 < once < c.score("red circle", ["a red circle"])


def test_mark_end_counts_an_end_token_in_every_caption():
    """mark_end scores as plain CIDEr-D would with one more, unique word at the end of every caption
    (corpus, references, hypothesis); a caption cut off mid-phrase then loses against its whole self."""
    corpus = [["a dog runs on the grass", "a brown dog on grass"], ["a man rides a bike", "a cyclist on a road"],
              ["two children play on the beach"]]
    marked, plain = CiderD(corpus, mark_end=True), CiderD([[r + " zzend" for r in refs] for refs in corpus])
    refs = corpus[0]
    for hyp in ("a dog runs on the grass", "a dog runs on the", "a brown dog", "two children"):
        assert marked.score(hyp, refs) == pytest.approx(plain.score(hyp + " zzend", [r + " zzend" for r in refs]), rel=1e-12)
    assert marked.tokens("a dog .") == ["a", "dog", CiderD.END] and CiderD(corpus).tokens("a dog .") == ["a", "dog"]
    cut, whole = "a brown dog on", "a brown dog on grass"
    assert marked.score(cut, refs) / marked.score(whole, refs) < CiderD(corpus).score(cut, refs) / CiderD(corpus).score(whole, refs)


def test_document_frequencies_come_from_the_given_corpus_only():
    """The known difference from pycocoevalcap: SCST's scorer takes its idf from the training
    references, the test metric from the test references. A word common in training but rare in
    the scored set counts for less."""
    train = [["a dog runs"], ["a dog sits"], ["a dog plays"], ["a cat sleeps"]]
    test_refs = {"x": ["a dog runs"], "y": ["a cat sleeps"]}
    from_train = CiderD(train).score("a dog", test_refs["x"])
    from_test = CiderD(test_refs.values()).score("a dog", test_refs["x"])
    assert from_train < from_test  # "dog": in 3 of 4 training images, 1 of 2 test images


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_python_tokens_equal_the_ptb_tokenizer_on_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = ["A man's dog runs, on the grass.", "Two kids don't play with a T-shirt!", "The dog is 3.5 feet tall ...",
            "A black and white dog jumps over a log", "People sit on a bench; a woman reads."]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    for i, c in enumerate(caps):
        assert " ".join(tokenize(c)) == ptb[i][0], c


# ------------------------------------------------------------------------------ baseline and loss


def test_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    base = mean_of_others(rewards)
    # by hand: (2 + 6) / 2, (1 + 6) / 2, (1 + 2) / 2; (0 + 3) / 2, (0 + 3) / 2, (0 + 0) / 2
    assert torch.equal(base, torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]]))
    # a sample's own reward never enters its baseline
    changed = rewards.clone()
    changed[0, 0] = 100.0
    assert mean_of_others(changed)[0, 0] == base[0, 0]
    with pytest.raises(ValueError):
        mean_of_others(torch.ones(2, 1))


def test_scst_loss_gradient_is_minus_advantage_over_samples():
    logprobs = torch.zeros(6, requires_grad=True)
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    loss, _ = scst_loss(logprobs, rewards)
    loss.backward()
    advantage = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    assert torch.allclose(logprobs.grad, -advantage / 6)


class FixedSampler(torch.nn.Module):
    """A 'captioner' whose samples are fixed texts; their log-probabilities are one parameter each."""

    def __init__(self, texts):
        super().__init__()
        self.texts = texts
        self.theta = torch.nn.Parameter(torch.zeros(len(texts)))

    def sample_with_logprobs(self, grid, k, max_len, generator=None):
        from vlbench.models.sampling import Samples

        assert len(grid) * k == len(self.texts)
        return Samples(torch.zeros(len(self.texts), 1), list(self.texts), self.theta * 1.0, torch.ones(len(self.texts)))


def test_reward_is_cider_d_of_each_sample_against_its_image_references():
    train_refs = [["a red circle", "the red circle"], ["two blue squares", "blue squares"], ["one green star"]]
    cider = CiderD(train_refs)
    texts = ["a red circle", "blue squares", "red", "two blue squares", "a red circle", "blue"]  # 2 images x 3
    model = FixedSampler(texts)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = ScstTrainer(model, cider, samples=3, max_len=10, optimizer=opt, clip=1e9)
    refs = [train_refs[0], train_refs[1]]
    expected = torch.tensor([[cider.score(t, refs[0]) for t in texts[:3]], [cider.score(t, refs[1]) for t in texts[3:]]])
    assert torch.allclose(trainer.rewards(texts, refs), expected.float())
    out = trainer.step(torch.zeros(2, 1, 1), refs)
    assert out["reward"] == pytest.approx(expected.mean().item(), rel=1e-6)
    # SGD at lr 1: theta moved by -grad = advantage / 6, so better-than-baseline samples got likelier
    advantage = expected - mean_of_others(expected)
    assert torch.allclose(model.theta.detach(), (advantage / 6).reshape(-1).float(), atol=1e-6)


# ------------------------------------------------------------------------------ sampling


def stepwise_grid_logprobs(model, grid, k, ids):
    """Summed log-probabilities of the sampled ids, one prefix at a time through the cache-free
    decoder state (renormalised without <pad>/<bos>, as sampled), up to and including each row's EOS:
    a path independent of both the KV cache the samples come from and the teacher-forced pass
    their gradients come from."""
    from vlbench.models.decoding import FullDecoding
    from vlbench.models.tokenizers import BOS, EOS

    state = FullDecoding(model, model.encode(grid).repeat_interleave(k, 0))
    seq = torch.full((len(ids), 1), BOS)
    steps = []
    for t in range(ids.shape[1]):
        logp = state.logp(seq).float()
        steps.append((logp - logp.logsumexp(-1, keepdim=True)).gather(1, ids[:, t : t + 1]).squeeze(1))
        seq = torch.cat([seq, ids[:, t : t + 1]], 1)
    logp = torch.stack(steps, 1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        if EOS in row:
            keep[r, row.index(EOS) + 1 :] = False
    return (logp * keep).sum(1), keep.sum(1)


def test_sentence_bleu_by_hand():
    refs = ["a dog runs on the grass", "the dog is on the lawn ."]
    # clipped precisions 5/5, 3/4, 2/3, 1/2; 2- to 4-grams add-one smoothed: 4/5, 3/4, 2/3;
    # brevity against the closest reference length (6 words) for 5 words: exp(1 - 6/5)
    expected = (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25 * math.exp(1 - 6 / 5)
    assert sentence_bleu("A dog runs on grass.", refs) == pytest.approx(expected, rel=1e-12)
    assert sentence_bleu("a dog runs on the grass .", refs) == pytest.approx(1.0)
    # "the" clipped at the 2 one reference holds
    assert sentence_bleu("the the the the the", refs) == pytest.approx((2 / 5 * 1 / 5 * 1 / 4 * 1 / 3) ** 0.25 * math.exp(1 - 6 / 5))
    assert sentence_bleu("a dog", refs) == 0.0  # no 3- or 4-gram at all
    assert sentence_bleu("", refs) == 0.0


def test_reward_adds_bleu_weight_times_sentence_bleu():
    train_refs = [["a red circle on a table", "the red circle"], ["two blue squares side by side", "blue squares"]]
    cider = CiderD(train_refs)
    texts = ["a red circle on the table", "a red circle", "red squares here", "two blue squares side by side",
             "blue squares side", "a red circle"]
    trainer = ScstTrainer(FixedSampler(texts), cider, samples=3, max_len=10,
                          optimizer=torch.optim.SGD(FixedSampler(texts).parameters(), lr=1.0), bleu_weight=0.5)
    refs = [train_refs[0]] * 3 + [train_refs[1]] * 3
    expected = torch.tensor([cider.score(t, r) + 0.5 * sentence_bleu(t, r) for t, r in zip(texts, refs)]).view(2, 3)
    got = trainer.rewards(texts, train_refs)
    assert torch.allclose(got, expected.float())
    trainer.bleu_weight = 0.0
    assert not torch.allclose(trainer.rewards(texts, train_refs), got)  # BLEU did move the reward


def test_grid_transformer_samples_carry_gradients_and_their_true_logprobs(trained_grid_captioner):
    model, grid = trained_grid_captioner
    grid = grid[:4]
    g = torch.Generator().manual_seed(0)
    s = model.sample_with_logprobs(grid, 3, 20, g)
    assert len(s.texts) == 12 and s.logprobs.shape == (12,) and s.logprobs.requires_grad
    assert s.texts == [model.vocab.decode(r) for r in s.ids.tolist()]
    assert len(set(s.texts)) > 1  # real samples, not one argmax
    with torch.no_grad():
        reference, lengths = stepwise_grid_logprobs(model, grid, 3, s.ids)
        assert torch.allclose(s.logprobs, reference, atol=1e-4)
        assert torch.equal(s.lengths, lengths)
    model.zero_grad()
    s.logprobs.sum().backward()
    assert model.in_proj[0].weight.grad.abs().sum() > 0  # gradients reach the image side
    model.zero_grad()
    again = model.sample_with_logprobs(grid, 3, 20, torch.Generator().manual_seed(0))
    assert again.texts == s.texts  # seeded


def test_grid_transformer_beams_are_its_beam_search_with_their_true_logprobs(trained_grid_captioner):
    """``scst.candidates: beam``: the k candidates of an image are the k beams of a width-k beam
    search, best first (the first is what ``generate`` decodes with that beam), distinct, with the
    summed log-probabilities of the cache-free path and gradients; no generator, so deterministic."""
    from vlbench.config import DecodingConfig

    model, grid = trained_grid_captioner
    grid, k = grid[:4], 3
    s = model.beams_with_logprobs(grid, k, 20)
    assert len(s.texts) == 12 and s.logprobs.shape == (12,) and s.logprobs.requires_grad
    assert s.texts == [model.vocab.decode(r) for r in s.ids.tolist()]
    with torch.no_grad():
        assert s.texts[::k] == model.generate(grid, DecodingConfig(strategy="beam", beam_size=k, max_len=20))
        reference, lengths = stepwise_grid_logprobs(model, grid, k, s.ids)
        assert torch.allclose(s.logprobs, reference, atol=1e-4)
        assert torch.equal(s.lengths, lengths)
    for i in range(len(grid)):
        rows = s.ids[i * k : (i + 1) * k]
        assert len({tuple(r) for r in rows.tolist()}) == k  # k different captions
        assert (reference[i * k : (i + 1) * k].diff() <= 1e-4).all()  # best first
    model.zero_grad()
    s.logprobs.sum().backward()
    assert model.in_proj[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    assert model.beams_with_logprobs(grid, k, 20).texts == s.texts


@pytest.fixture()
def gpt2_hub(monkeypatch):
    from vlbench.models import components, registry

    def tiny(_repo):
        torch.manual_seed(0)
        return components.random_gpt2(n_layer=2, n_embd=64, n_head=4)

    monkeypatch.setitem(registry.ONLINE["lm"], "hf/", tiny)


@pytest.mark.parametrize("model_name, options", [("vision_prefix", {"prefix_hidden": 32, "prefix_length": 3}),
                                                 ("vision_prefix", {"prefix_hidden": 32}),
                                                 ("cross_attention_lm", {"every_n_layers": 1})])
def test_lm_captioner_samples_carry_gradients_and_their_true_logprobs(model_name, options, batch, gpt2_hub):
    from vlbench.models.variants import build_variant, create_variant_model

    grid, _ = batch
    grid, k = grid[:3], 4
    raw = {"family": "captioning", "model": model_name, "image_encoder": "efficientnet_lite0",
           "language_model": "hf/gpt2", **options}
    model = create_variant_model(build_variant("t", raw), grid.shape[2], grid.shape[1]).eval()
    if model_name == "cross_attention_lm":
        with torch.no_grad():
            for block in model.blocks:
                block.gate.fill_(0.5)  # let the image in, so its gradients are not zero
    s = model.sample_with_logprobs(grid, k, 8, torch.Generator().manual_seed(0))
    assert len(s.texts) == len(grid) * k and s.logprobs.requires_grad
    eos = model.tokenizer.eos_token_id
    # the same log-probabilities from one teacher-forced pass over [image part, sampled tokens]
    with torch.no_grad():
        emb = model.lm.get_input_embeddings()(s.ids)
        if model_name == "vision_prefix":
            before = model.prefix_embeds(grid).repeat_interleave(k, 0)
            logits = model.lm(inputs_embeds=torch.cat([before, emb], 1)).logits[:, before.shape[1] - 1 : -1]
        else:
            with model.attending(model.vision(grid).repeat_interleave(k, 0)):
                start = model.start.expand(len(s.ids), -1, -1)
                logits = model.lm(inputs_embeds=torch.cat([start, emb], 1)).logits[:, :-1]
        logp = logits.float().log_softmax(-1).gather(2, s.ids[:, :, None]).squeeze(2)
        keep = torch.ones_like(s.ids, dtype=torch.bool)
        for r, row in enumerate(s.ids.tolist()):
            if eos in row:
                keep[r, row.index(eos) + 1 :] = False
        assert torch.allclose(s.logprobs, (logp * keep).sum(1), atol=1e-4)
        assert torch.equal(s.lengths, keep.sum(1))
    s.logprobs.sum().backward()
    assert all(p.grad is None for p in model.lm.parameters())  # the frozen LM stays frozen
    image_side = model.prefix[0].weight if model_name == "vision_prefix" else model.vision_proj[0].weight
    assert image_side.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ params


@pytest.mark.parametrize("edit, key", [({"steps": -1}, "steps"), ({"samples": 1}, "samples"), ({"lr": 0}, "lr"),
                                       ({"batch_size": 0}, "batch_size"), ({"max_len": 0}, "max_len"),
                                       ({"samples": "five"}, "samples"), ({"rounds": 3}, "rounds"),
                                       ({"warmup_steps": -1}, "warmup_steps"), ({"bleu_weight": -0.5}, "bleu_weight"),
                                       ({"dev_decoding": "beam"}, "dev_decoding"), ({"dev_images": -1}, "dev_images"),
                                       ({"eval_every": -5}, "eval_every"), ({"ema_decay": 1.0}, "ema_decay"),
                                       ({"patience": -1}, "patience")])
def test_bad_scst_params_name_the_key(edit, key):
    from vlbench.validation import validate_all

    params = copy.deepcopy(tiny_params())
    params["variants"]["gridcap"]["scst"] = edit
    with pytest.raises(ParamError) as e:
        validate_all(params)
    assert str(e.value).startswith(f"variants.gridcap.scst.{key}:"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model", ["vision_prefix", "cross_attention_lm"])
def test_beam_candidates_and_length_penalty_are_refused_for_the_lm_captioners(model):
    from vlbench.models.variants import build_variant

    raw = {"model": model, "image_encoder": "efficientnet_lite0", "scst": {"steps": 5, "candidates": "beam"}}
    with pytest.raises(ParamError, match=r"^variants\.t\.scst\.candidates: 'beam' is implemented for the grid transformer only"):
        build_variant("t", raw)
    lp = {**raw, "scst": {}, "decoding": {"strategy": "beam", "length_penalty": 1.0}}
    with pytest.raises(ParamError, match=r"^variants\.t\.decoding\.length_penalty: implemented for the grid transformer only"):
        build_variant("t", lp)
    assert build_variant("t", {**lp, "model": "grid_transformer"}).decoding.length_penalty == 1.0
    assert build_variant("t", {**raw, "model": "grid_transformer"}).scst.candidates == "beam"
    assert build_variant("t", {**raw, "scst": {"steps": 5}}).scst.candidates == "sample"


def test_scst_defaults_are_off_for_every_captioner():
    from vlbench.models.variants import build_variant

    for model in ("grid_transformer", "vision_prefix", "cross_attention_lm"):
        cfg = build_variant("t", {"model": model, "image_encoder": "efficientnet_lite0"})
        assert cfg.scst.steps == 0 and cfg.scst.samples == 5 and cfg.scst.lr == 1e-5
    params = copy.deepcopy(tiny_params())
    params["variants"]["gridcap"]["scst"] = {"steps": 10, "samples": 2, "lr": "3e-5", "batch_size": 4, "max_len": 12}
    from vlbench.validation import validate_all

    validate_all(params)


# ------------------------------------------------------------------------------ a toy task


def toy_task(seed: int = 0):
    """Six scenes, each a fixed random token grid plus noise, with five references that share a
    consensus core ("red circle left") in different phrasings."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(6, 4, 16, generator=g)
    things = [("red", "circle", "left"), ("blue", "square", "right"), ("green", "star", "top"),
              ("red", "square", "top"), ("blue", "circle", "left"), ("green", "circle", "right")]
    refs = [[f"a {c} {s} on the {p}", f"the {c} {s} at the {p}", f"a {c} {s} {p}", f"{c} {s} on the {p} side",
             f"there is a {c} {s} on the {p}"] for c, s, p in things]

    def images(n_per_scene, noise_seed):
        gn = torch.Generator().manual_seed(noise_seed)
        scene = torch.arange(6).repeat_interleave(n_per_scene)
        return protos[scene] + 0.3 * torch.randn(len(scene), 4, 16, generator=gn), [refs[i] for i in scene.tolist()]

    return images


@torch.no_grad()
def greedy_cider(model, cider, grid, references) -> float:
    """Corpus CIDEr-D x100 of the model's greedy captions of ``grid``."""
    model.eval()
    greedy = dataclasses.replace(model.cfg.decoding, strategy="greedy")
    return 100.0 * cider.corpus_score(model.generate(grid, greedy), references)


@pytest.mark.parametrize("candidates", ["sample", "beam"])
def test_scst_raises_dev_cider_on_a_toy_task(candidates):
    from vlbench.models.tokenizers import Vocabulary
    from vlbench.models.variants import build_variant, create_variant_model

    images = toy_task()
    train_grid, train_refs = images(4, 1)
    dev_grid, dev_refs = images(2, 2)
    torch.manual_seed(0)
    cfg = build_variant("t", {"model": "grid_transformer", "image_encoder": "efficientnet_lite0", **TINY_GRID,
                              "dropout": 0.0, "max_len": 12})
    model = create_variant_model(cfg, 16, 4, Vocabulary.build([c for r in train_refs for c in r]).itos)
    # cross-entropy on every reference: the model learns a mix of phrasings, and its greedy captions
    # are not all the consensus one ("a red circle left", not "a red circle on the left")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    flat = [(i, c) for i, r in enumerate(train_refs) for c in r]
    rng = random.Random(0)
    for _ in range(50):
        batch = rng.sample(flat, 16)
        loss = model.loss(train_grid[[i for i, _ in batch]], [c for _, c in batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cider = CiderD(train_refs)  # document frequencies: training references only
    before = greedy_cider(model, cider, dev_grid, dev_refs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = ScstTrainer(model, cider, samples=5, max_len=12, optimizer=opt, generator=torch.Generator().manual_seed(0),
                          candidates=candidates)
    rewards = []
    for step in range(8):
        idx = sorted(rng.sample(range(len(train_grid)), 8))
        rewards.append(trainer.step(train_grid[idx], [train_refs[i] for i in idx])["reward"])
    after = greedy_cider(model, cider, dev_grid, dev_refs)
    if candidates == "sample":  # the beams' mean reward need not rise in 8 steps: as the first beam
        assert np.mean(rewards[-3:]) > np.mean(rewards[:3])  # improves, the ones below it spread out
    assert after > before + 5, (before, after)
