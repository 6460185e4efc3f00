"""Reshaping between [B, T, D] states and [B, H, T, D/H] attention heads, for the attention code
written by hand (RoPE, the KV cache, gated cross-attention)."""
from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D/H] -> [B, T, D]
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)
