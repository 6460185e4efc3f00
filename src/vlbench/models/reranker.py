"""Cross-attention re-rankers: matchers over caption tokens and the image's grid tokens that re-order
the dual encoder's top-k candidates.

A cross-encoder must see every (image, caption) pair it scores, so scoring a whole test set would
cost n_images x n_captions forward passes. As in ALBEF/BLIP it only re-orders the dual encoder's
top-k candidates per query. Two matchers (``reranker.kind``):

- ``fusion``: ALBEF/BLIP's image-text matching (ITM) head on a small transformer whose caption
  tokens cross-attend to the image; trained on in-batch hard negatives drawn from the dual
  encoder's similarities (the pairs it will actually be asked to separate). A transformer pass per
  pair makes each pair dear, so it sees three pairs per caption and step.
- ``scan``: stacked cross attention (SCAN, Lee et al. 2018): each word attends over the image's
  grid regions and each region over the words, and the pair's score is the mean cosine of each
  with what it attended to. No transformer per pair, so it is trained on every pair of the batch
  (an InfoNCE loss like the dual encoder's) rather than on 3B.

Each matcher's ``loss`` is its training objective, so the dual encoder needs no dispatch on the kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import in_range, positive
from ..errors import ParamError


DEV_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # combine: dev: the matching logit's weights tried


@dataclass
class RerankerConfig:
    """Cross-attention re-ranker with an image-text matching head (``top_k: 0`` = none)."""

    top_k: int = 0  # candidates per query the cross-encoder re-orders
    kind: Literal["fusion", "scan"] = "fusion"  # the matcher (module docstring); layers, heads: fusion only
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    itm_weight: float = 1.0  # matching loss weight next to the contrastive loss
    # the score that orders the top-k: the matching logit alone (ALBEF/BLIP); the dual encoder's
    # logit plus it (sum); or the dual encoder's logit plus w x it, w chosen on the dev split from
    # DEV_WEIGHTS for each direction's best R@1 (dev: the evaluate stage does it; w = 0 keeps the
    # dual encoder's order, so re-ranking never costs dev R@1)
    combine: Literal["itm", "sum", "dev"] = "dev"

    def check(self, p):
        positive(p, self, "d_model", "layers", "heads", "itm_weight")
        if self.top_k < 0:
            raise ParamError(f"{p}.top_k: must be >= 0 (0 = no re-ranker), got {self.top_k}")
        if self.d_model % self.heads:
            raise ParamError(f"{p}.heads: d_model={self.d_model} is not divisible by heads={self.heads}")
        in_range(p, self, "dropout", 0.0, 0.9)


class CrossAttentionReranker(nn.Module):
    def __init__(self, text_dim: int, image_dim: int, n_grid: int, cfg):
        super().__init__()
        d = cfg.d_model
        self.text_in = nn.Linear(text_dim, d)
        self.image_in = nn.Sequential(nn.Linear(image_dim, d), nn.LayerNorm(d))
        self.image_pos = nn.Parameter(torch.randn(1, n_grid, d) * 0.02)
        # Each layer: self-attention over the caption, cross-attention caption -> image, MLP.
        layer = nn.TransformerDecoderLayer(d, cfg.heads, 4 * d, cfg.dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, cfg.layers)
        self.norm = nn.LayerNorm(d)
        self.itm = nn.Linear(d, 1)

    def project(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        """Per-caption and per-image input projections, done once before pairs are formed; the
        caption batch is trimmed to its longest caption."""
        n = int(text_mask.sum(1).max())
        return self.text_in(text_tokens[:, :n].float()), text_mask[:, :n], self.image_in(image_tokens.float()) + self.image_pos

    def score(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Match logits [B] for B aligned pairs of projected (caption, image) tokens."""
        h = self.layers(text, image, tgt_key_padding_mask=text_mask == 0)
        return self.itm(self.norm(h[:, 0])).squeeze(-1)  # the first (CLS) token reads the whole caption

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.score(*self.project(text_tokens, text_mask, image_tokens))

    def loss(self, logits, text_tokens, text_mask, image_tokens, image_ids=None) -> torch.Tensor:
        """``itm_loss`` (``image_ids`` unused: ``logits`` already rule out the image's other captions)."""
        return itm_loss(self, logits, text_tokens, text_mask, image_tokens)


class ScanMatcher(nn.Module):
    """SCAN's matcher, both attention directions averaged (its best: t-i + i-t). Text-to-image: word w
    attends over grid regions r with weights softmax_r(lambda x cos(t_w, v_r)) and scores its cosine
    with what it attended to, averaged over the caption's words; image-to-text likewise with each
    region attending over the words, averaged over the regions. Times a learned logit scale (SCAN:
    lambda = 9 and a margin loss; here lambda is learned and the loss is InfoNCE)."""

    def __init__(self, text_dim: int, image_dim: int, n_grid: int, cfg):
        super().__init__()
        self.text_in = nn.Linear(text_dim, cfg.d_model)
        self.image_in = nn.Linear(image_dim, cfg.d_model)
        self.attention_scale = nn.Parameter(torch.tensor(math.log(9.0)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def project(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        """Normalised word and region vectors, once per caption and image; captions trimmed to the longest."""
        n = int(text_mask.sum(1).max())
        text = F.normalize(self.text_in(text_tokens[:, :n].float()), dim=-1)
        return text, text_mask[:, :n], F.normalize(self.image_in(image_tokens.float()), dim=-1)

    def _score(self, cos: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, pairs: str):
        """``cos`` [*pairs, words, regions]; ``pairs`` "b" (aligned pairs: text, mask, image [B, ...]) or
        "ij" (every pair: image [I, ...], text and mask [J, ...]) names its leading dimensions.
        cos(t_w, sum_r a_r v_r) = sum_r a_r cos(t_w, v_r) / |sum_r a_r v_r|, and the squared norm is
        a^T (V V^T) a: the attended vectors themselves ([*pairs, words, d], [*pairs, regions, d]) are
        never formed, which made a B x B batch ten times dearer."""
        txt, img = ("b", "b") if pairs == "b" else ("j", "i")
        scaled = cos * self.attention_scale.exp()
        m = mask.float()[None] if pairs == "ij" else mask.float()  # [*pairs or 1, words]

        def cosine(att, gram, spec):  # cos with the attended vector, from the weights and the Gram matrix
            norm2 = (torch.einsum(spec, att, gram) * att).sum(-1 if spec.endswith("s") else -2)
            return (att * cos).sum(-1 if spec.endswith("s") else -2) / norm2.clamp_min(1e-12).sqrt()

        words = scaled.softmax(-1)  # each word over the regions
        text_to_image = cosine(words, image @ image.transpose(1, 2), f"{pairs}wr,{img}rs->{pairs}ws")
        text_to_image = (text_to_image * m).sum(-1) / m.sum(-1)
        regions = scaled.masked_fill(m[..., None] == 0, float("-inf")).softmax(-2)  # each region over the caption's words
        image_to_text = cosine(regions, text @ text.transpose(1, 2), f"{pairs}wr,{txt}wv->{pairs}vr").mean(-1)
        return self.logit_scale.exp() * (text_to_image + image_to_text) / 2

    def score(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Match logits [B] for B aligned pairs of projected (caption, image) tokens."""
        return self._score(torch.einsum("bwd,brd->bwr", text, image), text, text_mask, image, "b")

    def pairwise(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Match logits [n_images, n_captions] of every pair."""
        return self._score(torch.einsum("jwd,ird->ijwr", text, image), text, text_mask, image, "ij")

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.score(*self.project(text_tokens, text_mask, image_tokens))

    def loss(self, logits, text_tokens, text_mask, image_tokens, image_ids=None) -> torch.Tensor:
        """``scan_loss``."""
        return scan_loss(self, logits, text_tokens, text_mask, image_tokens, image_ids)


def create_reranker(text_dim: int, image_dim: int, n_grid: int, cfg) -> nn.Module:
    return (ScanMatcher if cfg.kind == "scan" else CrossAttentionReranker)(text_dim, image_dim, n_grid, cfg)


def scan_loss(matcher: ScanMatcher, logits: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
              image_tokens: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over every pair of the batch, both directions; entries of the dual encoder's ``logits``
    that are -inf (another caption of the same image) are no negatives here either. ``image_ids``
    [B] (which image each pair shows): an image that several pairs show is scored against the
    captions once (with 2 captions per image, half the work), its row copied to each of its pairs."""
    text, mask, image = matcher.project(text_tokens, text_mask, image_tokens)
    if image_ids is None:
        scores = matcher.pairwise(text, mask, image)
    else:
        ids, inverse = torch.unique(image_ids.to(image.device), return_inverse=True)
        one_pair = torch.empty(len(ids), dtype=torch.long, device=image.device).scatter_(
            0, inverse, torch.arange(len(inverse), device=image.device))  # a pair that shows each image
        scores = matcher.pairwise(text, mask, image[one_pair])[inverse]
    scores = scores.masked_fill(torch.isinf(logits), float("-inf"))
    target = torch.arange(len(scores), device=scores.device)
    return (F.cross_entropy(scores, target) + F.cross_entropy(scores.t(), target)) / 2


def hard_negatives(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative caption, and for each caption a negative image, sampled in
    proportion to the dual encoder's softmax similarity (never the matched pair itself)."""
    with torch.no_grad():
        eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        w = logits.float().masked_fill(eye, float("-inf"))
        neg_text = torch.multinomial(w.softmax(1), 1).squeeze(1)
        neg_image = torch.multinomial(w.t().softmax(1), 1).squeeze(1)
    return neg_text, neg_image


def itm_loss(reranker: CrossAttentionReranker, logits: torch.Tensor, text_tokens: torch.Tensor,
             text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """Binary matching loss on B positives and 2B hard negatives (one per image, one per caption)."""
    b = len(logits)
    neg_text, neg_image = hard_negatives(logits)
    ar = torch.arange(b, device=logits.device)
    text_idx = torch.cat([ar, neg_text, ar])
    image_idx = torch.cat([ar, ar, neg_image])
    text, mask, image = reranker.project(text_tokens, text_mask, image_tokens)
    scores = reranker.score(text[text_idx], mask[text_idx], image[image_idx])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).to(scores)
    return F.binary_cross_entropy_with_logits(scores, labels)


@torch.no_grad()
def top_k_scores(sim: torch.Tensor, k: int, score, batch_size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each query's top-k candidates by ``sim`` [n_images, n_captions] and their
    ``score(image_idx, caption_idx) -> match logits``, in both directions:
    -> {"i2t": (top [n_images, kk], logits), "t2i": (top [n_captions, kk], logits)}."""
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.t())):  # rows of s are queries
        kk = min(k, s.shape[1])
        top = s.topk(kk, dim=1).indices  # [Q, kk]
        query = torch.arange(len(s), device=s.device)[:, None].expand_as(top).reshape(-1)
        cand = top.reshape(-1)
        img, cap = (query, cand) if direction == "i2t" else (cand, query)
        logits = torch.cat([score(img[i : i + batch_size], cap[i : i + batch_size])
                            for i in range(0, len(img), batch_size)]).view(-1, kk)
        out[direction] = (top, logits)
    return out


def reorder_top_k(sim: torch.Tensor, scores: dict[str, tuple[torch.Tensor, torch.Tensor]], order,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order each query's top-k (``top_k_scores``) by ``order(first, logits) -> values``, where
    ``first`` [Q, kk] are the candidates' values in ``sim`` (``order``: one for both directions, or
    {"i2t": ..., "t2i": ...}). Returns (i2t_sim, t2i_sim): copies of
    ``sim`` in which each image's (row's) or caption's (column's) top-k candidates are lifted above
    every other entry (cosines lie in [-1, 1]) in that order; the rest keep the dual encoder's order.

    Ties stay ties, as the retrieval metrics count them (for the query): candidates the dual encoder
    scores exactly alike (the same caption text under several images, as in the shapes data) share
    one re-ranked value, the best of theirs, and so does every entry outside the top-k that ties with
    one inside (``topk`` keeps an arbitrary few of a tie). Breaking them instead cost the re-ranked
    i2t R@1 up to 7 points against the first stage's on the shapes data, re-ranking or not."""

    def lifted(s: torch.Tensor, top: torch.Tensor, logits: torch.Tensor, order) -> torch.Tensor:
        kk = top.shape[1]
        first = s.gather(1, top)
        values = order(first, logits)
        alike = first[:, :, None] == first[:, None, :]  # [Q, kk, kk]: the first stage can't tell them apart
        values = values[:, None, :].expand_as(alike).masked_fill(~alike, float("-inf")).amax(-1)
        ahead = (values[:, None, :] > values[:, :, None]).sum(-1)  # candidates strictly ahead: a tie shares it
        lift = (2 + kk - ahead).to(s.dtype)  # rank r (0 = best) -> 2 + kk - r, above any cosine
        out = s.clone()
        for q in range(0, len(s), chunk):  # entries tied with a top-k candidate take its value
            rows, f, v = s[q : q + chunk], first[q : q + chunk], lift[q : q + chunk]
            tied = rows[:, :, None] == f[:, None, :]  # [q, N, kk]
            value = v[:, None, :].expand_as(tied).masked_fill(~tied, float("-inf")).amax(-1)
            out[q : q + chunk] = torch.where(tied.any(-1), value, rows)
        return out

    orders = order if isinstance(order, dict) else {"i2t": order, "t2i": order}
    return lifted(sim, *scores["i2t"], orders["i2t"]), lifted(sim.t(), *scores["t2i"], orders["t2i"]).t()


def rerank_top_k(sim: torch.Tensor, k: int, score, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order each query's top-k by ``score(image_idx, caption_idx)`` alone -> (i2t_sim, t2i_sim)."""
    return reorder_top_k(sim, top_k_scores(sim, k, score, batch_size), lambda first, logits: logits)
