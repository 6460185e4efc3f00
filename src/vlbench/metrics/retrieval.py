"""Recall@K and ranks for image<->text retrieval with several captions per image.

``sim`` is [n_images, n_captions]; ``caption_image[j]`` is the image that caption j describes.
Image->text: an image's rank is that of its best-ranked own caption (any of its captions is a hit).
Text->image: a caption's rank is that of its one image. Ties are counted in the query's favour.
"""
from __future__ import annotations

import math

import torch


def ranks(sim: torch.Tensor, caption_image: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (image->text ranks [n_images], text->image ranks [n_captions]), 1-based."""
    n_img, n_txt = sim.shape
    caption_image = caption_image.to(sim.device)
    own = caption_image[None, :] == torch.arange(n_img, device=sim.device)[:, None]  # [n_img, n_txt]
    if (own.sum(1) == 0).any():
        raise ValueError("every image needs at least one caption")
    i2t = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        rows, mask = sim[s : s + chunk], own[s : s + chunk]
        best_own = rows.masked_fill(~mask, float("-inf")).max(1).values
        i2t[s : s + chunk] = ((rows > best_own[:, None]).sum(1) + 1).cpu()
    t2i = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk):
        cols = sim[:, s : s + chunk]
        target = cols.gather(0, caption_image[s : s + chunk][None, :]).squeeze(0)
        t2i[s : s + chunk] = ((cols > target[None, :]).sum(0) + 1).cpu()
    return i2t, t2i


def retrieval_metrics(sim: torch.Tensor, caption_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    i2t, t2i = ranks(sim, caption_image)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = (r <= k).float().mean().item() * 100
        out[f"{name}_median_rank"] = r.float().median().item()
        out[f"{name}_mean_rank"] = r.float().mean().item()
    out["rsum"] = sum(out[f"{n}_R@{k}"] for n in ("i2t", "t2i") for k in ks)
    return out


def chance_recall(n_images: int, captions_per_image: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall@K (in %) of a random ranking, for the same grouping."""
    n_txt = n_images * captions_per_image
    out = {}
    for k in ks:
        miss = math.comb(n_txt - captions_per_image, k) / math.comb(n_txt, k) if k <= n_txt else 0.0
        out[f"i2t_R@{k}"] = (1 - miss) * 100
        out[f"t2i_R@{k}"] = min(k, n_images) / n_images * 100
    return out


def querybank_scores(sim: torch.Tensor, bank_sim: torch.Tensor, beta: float, queries: str) -> torch.Tensor:
    """Query-bank normalisation of ``sim`` [n_images, n_captions] for one direction's queries: QB-Norm's
    inverted softmax (Bogolin et al., CVPR 2022). Some gallery items ("hubs") are close to many queries
    and take their R@1; each item's score is lowered by how strongly a bank of other queries already
    prefers it: ``beta s(q, g) - logsumexp over the bank of beta s(b, g)`` (the log of
    ``exp(beta s(q, g)) / sum_b exp(beta s(b, g))``).

    ``queries="t2i"``: captions query the images, ``bank_sim`` [n_bank, n_images] holds bank captions
    against the images; ``"i2t"``: images query the captions, ``bank_sim`` [n_bank, n_captions] holds
    bank images against the captions. Returns scores in ``sim``'s layout, for that direction only."""
    if queries not in ("i2t", "t2i"):
        raise ValueError(f"queries must be 'i2t' or 't2i', got {queries!r}")
    lse = querybank_offsets(bank_sim, beta)  # [n_gallery]
    scores = beta * sim.float()
    return scores - (lse[:, None] if queries == "t2i" else lse[None, :])


def querybank_offsets(bank_sim: torch.Tensor, beta: float) -> torch.Tensor:
    """What query-bank normalisation subtracts from ``beta`` x each gallery item's similarity to a
    query: the logsumexp over the bank of ``beta`` x the bank queries' similarities to it (``bank_sim``
    [n_bank, n_gallery]) -> [n_gallery]."""
    return torch.logsumexp(beta * bank_sim.float(), 0)


def both_ways(i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """Retrieval metrics when the two directions rank by different scores (a re-ranker, query-bank
    normalisation): the i2t metrics of ``i2t_scores``, the t2i metrics of ``t2i_scores``, their rsum."""
    out = {k: v for k, v in retrieval_metrics(i2t_scores, caption_image).items() if k.startswith("i2t")}
    out |= {k: v for k, v in retrieval_metrics(t2i_scores, caption_image).items() if k.startswith("t2i")}
    out["rsum"] = sum(v for k, v in out.items() if "_R@" in k)
    return out
