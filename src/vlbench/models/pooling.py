"""Token pooling: a token grid or sequence [B, T, C] -> one vector [B, C].

``cls`` and ``mean`` have no parameters (``pool_tokens``); the dual encoder's ``image_pooling`` adds
two learned ones for the image grid: ``attention`` (a learned query attending over the tokens) and
``gem`` (generalised mean with a learnable exponent)."""
from __future__ import annotations

import math

import torch
from torch import nn


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """``cls``: the first token. ``mean``: average of the tokens the mask keeps."""
    if how == "cls":
        return tokens[:, 0]
    if mask is None:
        return tokens.mean(1)
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1e-6)


class TokenPool(nn.Module):
    """``cls`` or ``mean`` (no parameters: a model's state_dict is the same as before these modules)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return pool_tokens(tokens, None, self.how)


class AttentionPool(nn.Module):
    """One learned query q attending over the tokens x_t: sum_t softmax_t(q . x_t / sqrt(C)) x_t.
    q starts at zero, where the weights are uniform: training starts from mean pooling."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = (tokens @ self.query / math.sqrt(tokens.shape[-1])).softmax(1)  # [B, T]
        return (weights.unsqueeze(-1) * tokens).sum(1)


class GeMPool(nn.Module):
    """Generalised mean (Radenovic et al. 2018): (mean_t x_t^p)^(1/p) per channel, p learnable
    (from 3; kept >= 1): p = 1 is the mean, p -> infinity the max. The tokens are clamped at a
    small positive number, as GeM assumes non-negative (post-ReLU) CNN activations."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        # in log space: x^p overflows float32 from 6^50 on (a ReLU6 grid, p grown by training)
        log_mean = (p * tokens.clamp(min=self.eps).log()).logsumexp(1) - math.log(tokens.shape[1])
        return (log_mean / p).exp()


def image_pool(how: str, dim: int) -> nn.Module:
    """The dual encoder's ``image_pooling`` as a module over [B, T, dim] tokens."""
    if how == "attention":
        return AttentionPool(dim)
    if how == "gem":
        return GeMPool()
    return TokenPool(how)
