"""CIDEr-D in pure Python, for rewards during training (self-critical sequence training) and for
dev scores without a JVM.

The maths is coco-caption's CIDEr-D, the scorer that pycocoevalcap ships as ``Cider``
(``pycocoevalcap/cider/cider_scorer.py``): for n = 1..4 each sentence is a tf-idf vector of its
n-grams (idf = log(number of images) - log(max(1, images whose references hold the n-gram)));
a hypothesis is compared with each reference of its image by a cosine whose numerator clips the
hypothesis weights at the reference's (``min(h, r) * r``), times a Gaussian length penalty
exp(-delta^2 / (2 sigma^2)) with sigma = 6; the mean over n and over the references, x10.
Like the original, the "length" in the penalty is the number of bigrams (words - 1).

Two differences from the test metric, both on purpose:

- Document frequencies come from the corpus given to ``CiderD`` (for rewards: the training
  references only; never the dev or test references). pycocoevalcap's ``Cider`` computes them from
  the references of the very set it scores. With the same corpus both give identical numbers
  (tests/test_scst.py checks this).
- Text is tokenised in Python (``tokenize``: lowercase; clitics split off as the PTB tokenizer
  does, "dog's" -> "dog 's", "don't" -> "do n't"; hyphenated words kept whole; punctuation dropped,
  as pycocoevalcap does after PTB) instead of Stanford's PTB tokenizer, which needs a JVM per call.
  On ordinary captions the tokens are the same.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

# words (hyphenated ones whole, decimals whole), clitics split off PTB-style
_TOKEN = re.compile(r"[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+(?:[-.][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """A caption -> its lowercase word tokens, punctuation dropped (approximately PTB's tokens
    minus the punctuation pycocoevalcap removes)."""
    return _TOKEN.findall(text.lower())


def ngram_counts(tokens: Sequence[str], n: int = 4) -> Counter:
    """Counts of every 1..n-gram (tuples) of ``tokens``."""
    counts = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus.

    ``corpus``: one list of reference captions per image (for SCST: the training references).
    ``score(hypothesis, references)`` is one caption's CIDEr-D on coco-caption's scale (10 =
    a caption equal to every one of its references; pycocoevalcap's number, which the evaluate
    stage reports x100).

    ``mark_end``: every caption (corpus, references, hypotheses) ends with an end-of-sentence token
    that is part of its n-grams, so "... on a" no longer matches the references' "on a" n-grams
    as well as "... on a bike" does: an SCST reward without it lets captions stop mid-phrase (the
    "bad endings" of self-critical training)."""

    END = "<eos>"  # never a token of ``tokenize`` (it keeps letters, digits, - . and ')

    def __init__(self, corpus: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0, mark_end: bool = False):
        self.n, self.sigma, self.mark_end = n, sigma, mark_end
        self.df: Counter = Counter()
        images = 0
        for refs in corpus:
            images += 1
            seen = set()
            for r in refs:
                seen.update(ngram_counts(self.tokens(r), n))
            self.df.update(seen)
        if images == 0:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.ref_len = math.log(float(images))
        self._refs_cache: dict[tuple[str, ...], list] = {}

    def tokens(self, text: str) -> list[str]:
        return tokenize(text) + [self.END] if self.mark_end else tokenize(text)

    def vector(self, counts: Counter):
        """n-gram counts -> (tf-idf vector per n, its norm per n, length = number of bigrams)."""
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            w = float(tf) * (self.ref_len - math.log(max(1.0, self.df.get(ngram, 0.0))))
            vec[k][ngram] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for k in range(self.n):
            rk = vr[k]
            val = sum(min(w, rk.get(g, 0.0)) * rk.get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            total += val * penalty
        return total

    def _reference_vectors(self, references: Sequence[str]) -> list:
        key = tuple(references)
        got = self._refs_cache.get(key)
        if got is None:
            got = [self.vector(ngram_counts(self.tokens(r), self.n)) for r in references]
            if len(self._refs_cache) < 200_000:
                self._refs_cache[key] = got
        return got

    def score(self, hypothesis: str, references: Sequence[str]) -> float:
        if not references:
            raise ValueError("CIDEr-D needs at least one reference per hypothesis")
        hyp = self.vector(ngram_counts(self.tokens(hypothesis), self.n))
        refs = self._reference_vectors(references)
        return 10.0 * sum(self._sim(hyp, r) for r in refs) / (self.n * len(refs))

    def scores(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """One CIDEr-D per hypothesis, ``references[i]`` being hypothesis i's references."""
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
        return np.array([self.score(h, r) for h, r in zip(hypotheses, references)], dtype=np.float64)

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """The mean over the hypotheses (pycocoevalcap's corpus CIDEr, same scale)."""
        return float(self.scores(hypotheses, references).mean()) if len(hypotheses) else 0.0


def cider_d(references: dict, hypotheses: dict) -> float:
    """Corpus CIDEr-D x100 (the evaluate stage's scale) with document frequencies from these
    references themselves, as pycocoevalcap's ``Cider`` computes them."""
    keys = list(references)
    scorer = CiderD(references[k] for k in keys)
    return 100.0 * scorer.corpus_score([hypotheses[k] for k in keys], [references[k] for k in keys])
