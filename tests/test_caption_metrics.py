"""The pycocoevalcap wrapper on hand-made references whose scores are known by hand.

The wrapper reports every metric x100. Each call starts Java (PTB tokenizer, METEOR), so the cases
are grouped into few calls."""
import math
import shutil

import pytest

from vlbench.metrics.caption import caption_metrics

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java on PATH")

# Captions that share no word with each other, so every n-gram of one image's reference occurs in
# that image only.
UNIQUE = {
    "a": "a red circle on the left",
    "b": "two blue squares at top",
    "c": "one green star near yellow triangles",
}


def test_identical_hypothesis_scores_one_and_cider_ten():
    refs = {k: [v] for k, v in UNIQUE.items()}
    out = caption_metrics(refs, dict(UNIQUE), spice=False)
    # Every n-gram of the hypothesis is in the reference and lengths match (brevity penalty 1):
    # each BLEU-n precision is 1, so BLEU-n = 1 (x100). ROUGE-L: LCS = whole sentence, P = R = 1 -> F = 1.
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-3)
    assert out["ROUGE-L"] == pytest.approx(100.0, abs=1e-6)
    # CIDEr-D: with one reference per image, hypothesis vector == reference vector for every n, so
    # each cosine is 1 and the length penalty exp(-0^2 / (2 * 6^2)) = 1; per image
    # 10 * mean_n(1) / 1 reference = 10, the corpus mean is 10 -> 1000 after x100.
    assert out["CIDEr"] == pytest.approx(1000.0, rel=1e-6)
    assert out["METEOR"] > 90.0  # 1 minus a small fragmentation penalty
    assert "SPICE" not in out


def test_no_shared_word_scores_zero_and_wrong_captions_lose_cider():
    refs = {k: [v] for k, v in UNIQUE.items()}
    # hypothesis for each image: another image's reference (rotated), sharing no word with its own
    wrong = {"a": UNIQUE["b"], "b": UNIQUE["c"], "c": UNIQUE["a"]}
    out = caption_metrics(refs, wrong, spice=False)
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(0.0, abs=1e-6)
    assert out["ROUGE-L"] == pytest.approx(0.0, abs=1e-9)
    assert out["CIDEr"] == pytest.approx(0.0, abs=1e-9)  # no common n-gram: every dot product is 0


def test_bleu1_clipping_and_brevity_penalty_by_hand():
    refs = {
        "x": ["the cat sat on the mat", "a cat is sitting on a mat"],   # lengths 6 and 7
        "y": ["the cat sat on the mat", "a cat is sitting on a mat"],
    }
    hyps = {"x": "the cat sat", "y": "the the the cat sat on mat"}
    out = caption_metrics(refs, hyps, spice=False)
    # pycocoevalcap BLEU is corpus-level with the "closest" reference length.
    # x: 3 words, all in a reference: 3 correct of 3; closest reference length to 3 is 6.
    # y: 7 words; "the" x3 is clipped to its max count in one reference (2): 2+1+1+1+1 = 6 correct of 7;
    #    closest reference length to 7 is 7.
    # unigram precision = (3 + 6) / (3 + 7) = 0.9; hypothesis length c = 10, reference length r = 6 + 7 = 13;
    # c < r, so brevity penalty = exp(1 - r / c) = exp(1 - 1.3) = exp(-0.3).
    expected = 0.9 * math.exp(-0.3)  # 0.66673...
    assert out["BLEU-1"] == pytest.approx(100 * expected, abs=1e-4)


def test_cider_ignores_a_caption_every_image_shares():
    shared = "a picture of some shapes"
    refs = {k: [v, shared] for k, v in UNIQUE.items()}
    perfect = caption_metrics(refs, dict(UNIQUE), spice=False)["CIDEr"]
    generic = caption_metrics(refs, {k: shared for k in UNIQUE}, spice=False)["CIDEr"]
    # IDF of an n-gram found in the references of all N images: log(N) - log(N) = 0, so the generic
    # caption's tf-idf vector is all zeros and its CIDEr-D is exactly 0.
    assert generic == pytest.approx(0.0, abs=1e-9)
    # The perfect caption matches its first reference exactly (cosine 1 for every n) and shares
    # nothing weighted with the second (only zero-IDF n-grams): per image 10 * (1 + 0) / 2 references = 5.
    assert perfect == pytest.approx(500.0, rel=1e-6)
