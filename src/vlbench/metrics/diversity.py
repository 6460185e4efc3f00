"""Diversity and fluency of a set of captions (one per image), next to the n-gram metrics:

- ``distinct_captions``: distinct captions per 1,000 images (1000 = every image got its own
  caption; a captioner that says the same few things everywhere scores low). Captions are compared
  as their word tokens (metrics/cider_d.py ``tokenize``: case and punctuation ignored).
- ``trigram_repeat``: % of captions in which some word trigram occurs twice or more ("a dog and a
  dog and a dog" repeats "a dog and"), the degenerate loop that trigram blocking prevents.

Computed for each captioner's test captions, each decoding, the baselines and the human references
(the first reference of each image), so the numbers have a human level to be read against.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from .cider_d import tokenize


def repeats_a_trigram(tokens: Sequence[str]) -> bool:
    counts = Counter(tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2))
    return any(n > 1 for n in counts.values())


def distinct_captions(captions: Sequence[str]) -> float:
    """Distinct captions per 1,000 captions."""
    if not captions:
        return 0.0
    return 1000.0 * len({tuple(tokenize(c)) for c in captions}) / len(captions)


def trigram_repeat(captions: Sequence[str]) -> float:
    """% of captions with a word trigram that occurs at least twice."""
    if not captions:
        return 0.0
    return 100.0 * sum(repeats_a_trigram(tokenize(c)) for c in captions) / len(captions)


def diversity(captions: Sequence[str]) -> dict[str, float]:
    return {"distinct_captions": distinct_captions(captions), "trigram_repeat": trigram_repeat(captions)}
