"""Decodings side by side in the evaluate stage: which decodings a captioner is scored with, their
names in ``metrics/<variant>.json`` (``decodings: {greedy: {...}, beam3: {...}}``), and one
scoring call per decoding (pycocoevalcap metrics plus diversity).

``evaluate.decodings`` lists them (default: greedy and beam): ``greedy``, ``beam`` (the variant's
``decoding.beam_size``), ``greedy_block_trigrams``, ``beam_block_trigrams`` (no token trigram twice
in a caption). The variant's own ``decoding`` is always scored too (it gives the headline metrics);
when it equals a listed one, its captions are generated and scored once.
"""
from __future__ import annotations

import dataclasses

from .diversity import diversity

BLOCK = "_block_trigrams"


def decoding_name(d) -> str:
    """greedy | beam<k> (plus ``_lp<length_penalty>`` when not 0) | nucleus, plus ``_block_trigrams``
    when set, plus ``_rerank<neighbours>x<weight>`` for consensus re-ranking (a valid MLflow
    metric-name part)."""
    base = f"beam{d.beam_size}" if d.strategy == "beam" else d.strategy
    if d.strategy == "beam" and getattr(d, "length_penalty", 0):
        base += f"_lp{d.length_penalty:g}"
    base += BLOCK if getattr(d, "block_trigrams", False) else ""
    if d.strategy == "beam" and getattr(d, "rerank_neighbours", 0):
        base += f"_rerank{d.rerank_neighbours}x{d.rerank_weight:g}"
    return base


def decodings_to_compare(configured, names) -> tuple[dict, str]:
    """-> ({name: decoding config}, the configured decoding's name), the listed ones first.
    ``names``: entries of ``evaluate.decodings``."""
    out = {}
    for n in names:
        strategy = n.removesuffix(BLOCK)
        # the listed ones search without re-ranking: beside the configured one they show what it adds
        d = dataclasses.replace(configured, strategy=strategy, block_trigrams=n.endswith(BLOCK), rerank_neighbours=0)
        out[decoding_name(d)] = d
    head = decoding_name(configured)
    out[head] = configured  # the variant's own decoding, exactly as configured
    return out, head


def score(references: dict, hypotheses: dict, spice: bool = True) -> dict:
    """pycocoevalcap metrics (one JVM run per scorer) and the diversity of the hypotheses."""
    from .caption import caption_metrics

    return {**caption_metrics(references, hypotheses, spice=spice), **diversity([hypotheses[k] for k in references])}
