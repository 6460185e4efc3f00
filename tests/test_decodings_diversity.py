"""Decodings side by side (issue #14): trigram blocking in the grid transformer's own search and in
generate's arguments, the names and choice of the decodings the evaluate stage scores, the diversity
metrics on hand-made captions, and the report's tables."""
import copy

import pytest
import torch

from conftest import tiny_params
from vlbench.config import DecodingConfig
from vlbench.errors import ParamError
from vlbench.metrics.decodings import decoding_name, decodings_to_compare
from vlbench.metrics.diversity import distinct_captions, diversity, repeats_a_trigram, trigram_repeat
from vlbench.metrics.cider_d import tokenize
from vlbench.models.decoding import TrigramBlocking, beam_search, sample_or_greedy

# ------------------------------------------------------------------------------ diversity


def test_diversity_of_hand_made_captions():
    caps = ["a dog runs", "A dog runs.", "a cat", "a dog and a dog and a dog", "the red ball the red ball"]
    # distinct as word tokens (case and punctuation ignored): {a dog runs, a cat, a dog and..., the red ball...}
    assert distinct_captions(caps) == pytest.approx(1000 * 4 / 5)
    # "a dog and" occurs twice in the 4th, "the red ball" twice in the 5th: 2 of 5 captions
    assert trigram_repeat(caps) == pytest.approx(40.0)
    assert diversity(caps) == {"distinct_captions": pytest.approx(800.0), "trigram_repeat": pytest.approx(40.0)}
    assert repeats_a_trigram("a a a a".split()) and not repeats_a_trigram("a a a".split())
    assert not repeats_a_trigram("a dog , a dog".split())  # a repeated bigram is not a repeated trigram
    assert distinct_captions(["same"] * 1000) == pytest.approx(1.0)
    assert diversity([]) == {"distinct_captions": 0.0, "trigram_repeat": 0.0}


# ------------------------------------------------------------------------------ trigram blocking


class Looping:
    """A decoder state that always prefers the cycle 4 -> 5 -> 6 -> 4 ..., then other tokens, EOS last."""

    V, EOS = 10, 2

    def __init__(self, rows):
        self.device, self.rows = torch.device("cpu"), rows

    def logp(self, ids):
        last = ids[:, -1]
        scores = torch.zeros(len(ids), self.V)
        scores[:, 7:] = 1.0  # fallbacks
        scores[torch.arange(len(ids)), 4 + (last - 3) % 3] = 5.0  # the next token of the cycle
        scores[:, self.EOS] = -5.0
        scores[:, :2] = float("-inf")  # pad, bos
        return scores.log_softmax(-1)

    def reorder(self, rows):
        pass


def has_repeated_trigram(row) -> bool:
    row = [int(t) for t in row]
    return repeats_a_trigram([str(t) for t in row[1 : row.index(2) if 2 in row else len(row)]])


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_trigram_blocking_breaks_a_loop(search):
    def run(state):
        if search == "beam":
            return beam_search(state, 2, 1, Looping.EOS, 3, 16)
        return sample_or_greedy(state, 2, 1, Looping.EOS, 16, DecodingConfig(strategy="greedy"))

    plain = run(Looping(2))
    assert all(has_repeated_trigram(r) for r in plain.tolist())  # the loop: 4 5 6 4 5 6 ...
    blocked = run(TrigramBlocking(Looping(2)))
    assert not any(has_repeated_trigram(r) for r in blocked.tolist())
    assert blocked.shape[1] > 6  # it went on, with other tokens


class ShortOrLong:
    """A decoder state with two captions: EOS at once (log p = log 0.5 + log 1), or token 3 then
    three times token 4 then EOS, each step at 0.9 after the first 0.5: the short caption has the
    larger sum of log-probabilities, the long one the larger mean per token."""
    EOS, V = 2, 5

    def __init__(self):
        self.device = torch.device("cpu")

    def logp(self, ids):
        p = torch.full((len(ids), self.V), 1e-6)
        for r, row in enumerate(ids.tolist()):
            if len(row) == 1:
                p[r, self.EOS], p[r, 3] = 0.5, 0.5
            else:
                p[r, 4 if len(row) < 5 else self.EOS] = 0.9
        return (p / p.sum(-1, keepdim=True)).log()

    def reorder(self, rows):
        pass


def test_length_penalty_ranks_by_the_mean_per_token():
    def caption(lp):
        return [t for t in beam_search(ShortOrLong(), 1, 1, ShortOrLong.EOS, 2, 10, lp)[0].tolist()[1:] if t != 2]

    assert caption(0.0) == []  # sum: log 0.5 > log 0.5 + 4 log 0.9
    assert caption(1.0) == [3, 4, 4, 4]  # mean: log 0.5 / 1 < (log 0.5 + 4 log 0.9) / 5
    assert decoding_name(DecodingConfig(strategy="beam", beam_size=3, length_penalty=1.0, block_trigrams=True)) \
        == "beam3_lp1_block_trigrams"
    assert decoding_name(DecodingConfig(strategy="greedy", length_penalty=1.0)) == "greedy"


def test_grid_transformer_blocks_trigrams_with_and_without_cache(trained_grid_captioner):
    model, grid = trained_grid_captioner
    for strategy in ("greedy", "beam"):
        dec = DecodingConfig(strategy=strategy, beam_size=3, max_len=20, block_trigrams=True)
        cached = model.generate(grid, dec, use_cache=True)
        assert cached == model.generate(grid, dec, use_cache=False)
        assert not any(repeats_a_trigram(tokenize(c)) for c in cached)


def test_lm_captioners_block_trigrams_through_generate():
    from vlbench.models.hf_generate import hf_generate_kwargs

    class Tok:
        eos_token_id, pad_token_id = 0, 0

    assert "no_repeat_ngram_size" not in hf_generate_kwargs(DecodingConfig(), Tok(), True)
    for strategy in ("greedy", "beam", "nucleus"):
        kw = hf_generate_kwargs(DecodingConfig(strategy=strategy, block_trigrams=True), Tok(), True)
        assert kw["no_repeat_ngram_size"] == 3


# ------------------------------------------------------------------------------ which decodings


def test_decodings_to_compare_names_and_headline():
    beam5 = DecodingConfig(strategy="beam", beam_size=5)
    runs, head = decodings_to_compare(beam5, ["greedy", "beam", "beam_block_trigrams"])
    assert list(runs) == ["greedy", "beam5", "beam5_block_trigrams"] and head == "beam5"
    assert runs["beam5"] is beam5 and runs["beam5_block_trigrams"].block_trigrams
    assert runs["greedy"].strategy == "greedy" and not runs["greedy"].block_trigrams
    nucleus = DecodingConfig(strategy="nucleus", top_p=0.8)
    runs, head = decodings_to_compare(nucleus, ["greedy", "beam"])
    assert list(runs) == ["greedy", "beam3", "nucleus"] and head == "nucleus"  # the configured one is added
    runs, head = decodings_to_compare(DecodingConfig(block_trigrams=True), ["greedy", "beam"])
    assert head == "greedy_block_trigrams" and list(runs) == ["greedy", "beam3", "greedy_block_trigrams"]
    runs, head = decodings_to_compare(DecodingConfig(), [])
    assert list(runs) == ["greedy"] and head == "greedy"
    assert decoding_name(DecodingConfig(strategy="beam", beam_size=2, block_trigrams=True)) == "beam2_block_trigrams"


@pytest.mark.parametrize("edit, key", [({"decodings": ["top_k"]}, "evaluate.decodings[0]"),
                                       ({"decodings": "greedy"}, "evaluate.decodings"),
                                       ({"decodings": ["greedy", "beam_trigrams"]}, "evaluate.decodings[1]")])
def test_bad_decodings_name_the_key(edit, key):
    from vlbench.validation import validate_all

    params = copy.deepcopy(tiny_params())
    params["evaluate"].update(edit)
    with pytest.raises(ParamError) as e:
        validate_all(params)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_block_trigrams_param_is_a_bool():
    from vlbench.validation import validate_all

    params = copy.deepcopy(tiny_params())
    params["variants"]["gridcap"]["decoding"] = {"block_trigrams": "yes"}
    with pytest.raises(ParamError, match=r"^variants\.gridcap\.decoding\.block_trigrams:"):
        validate_all(params)


# ------------------------------------------------------------------------------ report


def caption_result(name, decodings=True):
    m = {"BLEU-1": 50.0, "BLEU-4": 10.0, "METEOR": 15.0, "ROUGE-L": 30.0, "CIDEr": 20.0, "SPICE": "unavailable (x)"}
    r = {"variant": name, "family": "captioning", "images": 10, "metrics": dict(m, distinct_captions=300.0, trigram_repeat=2.0),
         "speed": {"captions_per_s": 5.0, "peak_memory_mb": 100.0}, "trainable_params": 1000,
         "nearest_neighbour": dict(m, CIDEr=5.0, distinct_captions=700.0, trigram_repeat=0.0),
         "chance": dict(m, CIDEr=1.0, distinct_captions=990.0, trigram_repeat=0.0)}
    if decodings:
        r["references"] = {"distinct_captions": 1000.0, "trigram_repeat": 0.5}
        r["decoding"] = "beam3"
        r["decodings"] = {"greedy": dict(r["metrics"], CIDEr=25.0, captions_per_s=9.0),
                          "beam3": dict(r["metrics"], captions_per_s=5.0)}
    return r


def test_report_shows_decodings_side_by_side_and_diversity():
    from vlbench.stages.report import summarise

    text = summarise([caption_result("cap"), caption_result("old", decodings=False)])
    assert "distinct_captions | trigram_repeat" in text
    assert "| *human references* (first reference per image) | - | - | - | - | - | - | 1000.0 | 0.5 |" in text
    assert "## Captioning: decodings side by side" in text
    assert "| cap | **greedy** |" in text and "| cap | beam3 (configured) |" in text
    assert "Best decoding by CIDEr: cap: greedy (configured: beam3)." in text
    assert "| old |" in text  # a result from before these keys still renders
