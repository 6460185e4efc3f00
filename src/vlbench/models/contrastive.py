"""The dual encoder's alignment losses beyond plain InfoNCE (``loss:`` in its params), on
L2-normalised image and caption embeddings of a batch of matched pairs (row b of each is pair b).

``positives`` [B, B] marks the pairs (image row i, caption column j) that match: the diagonal, plus,
when several captions of one image are in the batch (``captions_per_image: k``), every pair of
rows that show the same image (``same_image``). The plain InfoNCE, which counts those as
negatives, stays ``dual_encoder.contrastive_loss``.

Why ``multi_positive`` drops the other positives from the denominator rather than spreading each
row's target over them: on a batch whose rows repeat an image (embedded alike), a target spread
evenly over the image's captions gives exactly InfoNCE's loss, hence its gradients (the repeated
rows' cross-entropies average to the spread one; tests/test_contrastive_loss.py checks it): the
"false negatives" of InfoNCE on such a batch cancel out, and spreading would change nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def same_image(image_ids: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: rows i and j of the batch show the same image."""
    return image_ids[:, None] == image_ids[None, :]


def _logsumexp_where(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log(sum over ``keep`` of e^x); a very negative number (not -inf: no NaN gradients)
    for a row that keeps nothing."""
    return x.masked_fill(~keep, torch.finfo(x.dtype).min).logsumexp(1)


def multi_positive_info_nce(logits: torch.Tensor, positives: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """One direction of the contrastive loss, rows as queries, the matched pair on the diagonal:
    the mean over rows b of

        -log( e^{s_bb} / (e^{s_bb} + N_b) ),   N_b = sum over the row's negatives j of e^{s_bj}

    The row's other positives (another caption of the same image, or the same image again) are
    in neither the numerator nor the denominator: not counted as negatives. With the diagonal as
    the only positives this is InfoNCE (cross-entropy on the diagonal).

    ``beta`` > 0: hard-negative weighting (Robinson et al., ICLR 2021, without the debiasing term):
    N_b = |neg| * sum_j w_j e^{s_bj} with w_j = e^{beta s_bj} / sum_k e^{beta s_bk}, the negatives
    importance-weighted towards the harder ones, mean weight 1; beta = 0 gives the plain sum.
    """
    logits = logits.float()
    negatives = ~positives
    if beta:
        n_neg = negatives.sum(1).to(logits.dtype)
        neg = (_logsumexp_where((1 + beta) * logits, negatives) - _logsumexp_where(beta * logits, negatives)
               + n_neg.log())
    else:
        neg = _logsumexp_where(logits, negatives)
    matched = logits.diagonal()
    return (torch.logaddexp(matched, neg) - matched).mean()


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor,
                        beta: float = 0.0) -> torch.Tensor:
    """Symmetric ``multi_positive_info_nce``: image->caption over the rows, caption->image over the columns."""
    logits = logit_scale * img @ txt.t()
    return (multi_positive_info_nce(logits, positives, beta) + multi_positive_info_nce(logits.t(), positives.t(), beta)) / 2


def max_violation_loss(img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor, margin: float) -> torch.Tensor:
    """VSE++ (Faghri et al., BMVC 2018): for each matched pair b (row b, column b), a hinge on the
    cosine of its image's hardest negative caption and of its caption's hardest negative image:

        [margin - s(b, b) + max_j s(b, j)]+ + [margin - s(b, b) + max_i s(i, b)]+

    over the negatives only (never another caption of the same image); mean over the batch (VSE++
    sums: the mean keeps the learning rate of the other losses). No temperature."""
    sim = (img @ txt.t()).float()
    matched = sim.diagonal()
    beyond = sim.masked_fill(positives, torch.finfo(sim.dtype).min)
    hardest_caption, hardest_image = beyond.max(1).values, beyond.max(0).values
    return (F.relu(margin - matched + hardest_caption) + F.relu(margin - matched + hardest_image)).mean()
