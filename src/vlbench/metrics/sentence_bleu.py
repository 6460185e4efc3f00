"""Sentence-level BLEU-4 for rewards during self-critical training (``scst.bleu_weight``).

coco-caption's BLEU (pycocoevalcap ``Bleu``, the evaluate stage's metric) is a corpus score: it
sums clipped n-gram matches and lengths over every caption before taking the geometric mean, so
one caption's share of it is not defined. The reward here is the usual sentence form of the same
quantities, per caption: clipped n-gram precisions against all of its references, the brevity
penalty against the reference length closest to the caption's (coco-caption's "closest"), and
add-one smoothing of the 2- to 4-gram precisions (Lin & Och 2004), so a caption with no 4-gram
match still earns a reward graded by its shorter matches instead of a flat zero. A caption of
fewer than n words scores 0. Tokens are
``cider_d.tokenize``'s, the CIDEr-D reward's.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from .cider_d import ngram_counts, tokenize


def reference_clips(references: Sequence[str], n: int = 4) -> tuple[Counter, list[int]]:
    """What every caption of one image is scored against: per n-gram the largest count in any one
    reference (the clip), and the references' lengths. Built once per image, not per caption."""
    if not references:
        raise ValueError("BLEU needs at least one reference per hypothesis")
    most = Counter()
    lengths = []
    for r in references:
        tokens = tokenize(r)
        lengths.append(len(tokens))
        for g, c in ngram_counts(tokens, n).items():
            if c > most[g]:
                most[g] = c
    return most, lengths


def sentence_bleu(hypothesis: str, references: Sequence[str], n: int = 4) -> float:
    """BLEU-n of one caption against its references, in [0, 1]."""
    return bleu_against(hypothesis, reference_clips(references, n), n)


def bleu_against(hypothesis: str, clips: tuple[Counter, list[int]], n: int = 4) -> float:
    """BLEU-n of one caption against ``reference_clips(references, n)``, in [0, 1]."""
    most, ref_lengths = clips
    hyp = tokenize(hypothesis)
    if not hyp:
        return 0.0
    counts = ngram_counts(hyp, n)
    log_precision = 0.0
    for k in range(1, n + 1):
        total = len(hyp) - k + 1
        if total <= 0:  # shorter than n words: no n-gram to match (smoothing would make it a perfect 1)
            return 0.0
        matched = sum(min(c, most[g]) for g, c in counts.items() if len(g) == k)
        if k > 1:  # add-one smoothing
            matched, total = matched + 1, total + 1
        if matched == 0:
            return 0.0
        log_precision += math.log(matched / total) / n
    closest = min(ref_lengths, key=lambda length: (abs(length - len(hyp)), length))
    brevity = min(0.0, 1.0 - closest / len(hyp))
    return math.exp(log_precision + brevity)
