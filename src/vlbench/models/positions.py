"""Positions of the image grid tokens for the grid transformer's encoder: fixed 2D sin/cos, or 2D
rotary embeddings (RoPE) of queries and keys in a self-attention layer of its own."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .multihead import merge_heads, split_heads


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2D sinusoidal encoding of a side x side grid (row-major, like the flattened feature
    map): a quarter of the channels each for sin/cos of the row and of the column. -> [1, side*side, dim]"""
    quarter = dim // 4
    freq = 10000.0 ** (-torch.arange(quarter) / quarter)
    row, col = (a.flatten().float()[:, None] * freq for a in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    return torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], -1)[None]


def rope_2d_tables(side: int, head_dim: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [side*side, head_dim] for axial 2D RoPE: the first half of each head rotates
    with the row, the second half with the column. A small base because positions only reach side-1."""
    quarter = head_dim // 4
    freq = base ** (-torch.arange(quarter) / quarter)
    row, col = (a.flatten().float()[:, None] * freq for a in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    angles = torch.cat([row, row, col, col], -1)
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [..., T, head_dim] by the tables: pairs (i, i + head_dim/4) within each half."""
    row, col = x.chunk(2, -1)
    rotated = torch.cat([torch.cat([-h.chunk(2, -1)[1], h.chunk(2, -1)[0]], -1) for h in (row, col)], -1)
    return x * cos + rotated * sin


class RotaryEncoderLayer(nn.TransformerEncoderLayer):
    """Pre-norm encoder layer whose self-attention applies 2D RoPE to queries and keys, so scores
    depend on relative (row, col) offsets. Same parameters as nn.TransformerEncoderLayer; its own
    forward because the stock one's inference fast path would skip the rotation."""

    def __init__(self, side: int, **layer):
        super().__init__(**layer)
        cos, sin = rope_2d_tables(side, layer["d_model"] // layer["nhead"])
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src + self.dropout1(self._rotary_attention(self.norm1(src)))
        return x + self._ff_block(self.norm2(x))

    def _rotary_attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn
        q, k, v = (split_heads(t, attn.num_heads) for t in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
        q, k = apply_rope_2d(q, self.rope_cos, self.rope_sin), apply_rope_2d(k, self.rope_cos, self.rope_sin)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(merge_heads(out))
