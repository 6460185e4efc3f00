"""Flamingo-style captioner: a frozen causal LM reads the image through trainable gated
cross-attention blocks run before every n-th decoder layer.

Each block: LayerNorm(hidden) -> multi-head attention (queries from the LM hidden states, keys and
values from the projected vision tokens) -> dropout -> x tanh(gate), added to the hidden states.
The gate starts at 0, so at init the LM computes exactly what it computed before; training opens
it. The LM's self-attention and MLPs stay frozen: only the blocks, the vision projection and the
start token's input embedding train (and are saved).

The blocks run as forward pre-hooks of the LM's decoder layers, so the LM's module tree (which HF
code inspects) is untouched. The vision tokens reach them through ``attending(vision)``: set on
every block before the LM runs (a training forward, or HF ``generate`` with its KV cache) and
cleared after; each block projects them to keys/values once per call, not once per new token.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (DecodingConfig, OptimConfig, ScstConfig, VariantConfig, check_lm_captioner_search, in_range,
                      positive)
from .lm_captioner import LMCaptioner
from .sampling import Samples, sample_after_embeds
from .multihead import merge_heads, split_heads
from .registry import check_image_encoder, check_language_model, create_language_model
from .tokenizers import pad_sequences
from .variant_registry import register_variant


@dataclass
class CrossAttentionLMConfig(VariantConfig):
    """Flamingo-style: a frozen causal LM with trainable tanh-gated cross-attention blocks (zero
    gate at init) over the projected vision tokens, before every n-th decoder layer."""

    language_model: str = "smollm2_135m"
    every_n_layers: int = 2
    heads: int = 8  # cross-attention heads; must divide the LM's hidden size
    # The zero-init gates learn this many times faster than the other weights: at lr 1e-3 Adam
    # keeps a gate under ~0.1 for the first hundred steps, and a closed gate shows no image.
    gate_lr_scale: float = 1.0
    dropout: float = 0.1
    max_len: int = 40  # LM tokens (subwords), caption + EOS
    caption_sampling: Literal["random", "all"] = "random"
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=16, steps=150))
    scst: ScstConfig = field(default_factory=ScstConfig)  # self-critical CIDEr-D training after optim.steps

    def check(self, p):
        positive(p, self, "every_n_layers", "heads", "max_len", "gate_lr_scale")
        in_range(p, self, "dropout", 0.0, 0.9)
        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_language_model(f"{p}.language_model", self.language_model)
        check_lm_captioner_search(p, self.decoding, self.scst)


class GatedCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, gate_lr_scale: float = 1.0):
        super().__init__()
        self.heads, self.gate_lr_scale = heads, gate_lr_scale
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: the LM starts exactly unchanged
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_vision(self, vision: torch.Tensor | None) -> None:
        """vision [B, T, D] -> this block's keys/values [B, H, T, D/H] (None clears them)."""
        self.memory = None if vision is None else tuple(split_heads(t, self.heads) for t in self.kv(vision).chunk(2, -1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.memory is None:
            raise RuntimeError("no vision tokens set: run the LM inside CrossAttentionLMCaptioner.attending()")
        keys, values = self.memory
        if keys.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"vision tokens for {keys.shape[0]} rows, LM batch has {hidden.shape[0]}")
        q = split_heads(self.q(self.norm(hidden)), self.heads)
        attended = merge_heads(F.scaled_dot_product_attention(q, keys, values))
        # Adam moves a parameter by about lr per step whatever its gradient's size, so tanh(k * gate)
        # is the gate trained at k times the learning rate: short runs can open it.
        return hidden + torch.tanh(self.gate_lr_scale * self.gate) * self.dropout(self.out(attended))


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers: the module list as long as its layer count."""
    n = lm.config.get_text_config().num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(lm).__name__}")


def _prepend(block: GatedCrossAttention):
    """A pre-hook that runs ``block`` on the layer's hidden states (first argument or keyword)."""
    def hook(_module, args, kwargs):
        if args:
            return (block(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"])}

    return hook


class CrossAttentionLMCaptioner(LMCaptioner):
    def __init__(self, cfg, image_dim: int, n_grid: int, lm):
        super().__init__(cfg, lm)
        if lm.dim % cfg.heads:
            raise ValueError(f"heads: {cfg.heads} does not divide the language model's hidden size {lm.dim}")
        self.vision_proj = nn.Sequential(nn.Linear(image_dim, lm.dim), nn.LayerNorm(lm.dim))
        self.vision_pos = nn.Parameter(torch.randn(1, n_grid, lm.dim) * 0.02)
        layers = decoder_layers(self.lm)
        chosen = range(0, len(layers), cfg.every_n_layers)
        self.blocks = nn.ModuleList(GatedCrossAttention(lm.dim, cfg.heads, cfg.dropout, cfg.gate_lr_scale) for _ in chosen)
        for i, block in zip(chosen, self.blocks):
            layers[i].register_forward_pre_hook(_prepend(block), with_kwargs=True)
        # The caption follows a start token (BOS, or EOS for LMs without one: GPT-2 style) whose
        # input embedding is trained: an instruct LM's BOS (SmolLM2's <|im_start|>) expects a chat
        # role next, and the frozen LM alone would open every caption with that guess.
        self.start_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        self.start = nn.Parameter(self.lm.get_input_embeddings().weight[self.start_id].detach().clone().view(1, 1, -1))

    def vision(self, grid: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(grid.float()) + self.vision_pos

    @contextmanager
    def attending(self, vision: torch.Tensor):
        for block in self.blocks:
            block.set_vision(vision)
        try:
            yield
        finally:
            for block in self.blocks:
                block.set_vision(None)

    def tokenize(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input ids [start, " caption", eos, pad...], attention mask, labels (caption tokens only).
        Padding by hand: the pad id is the EOS id here, so labels must come from lengths, not ids."""
        body = self.tokenize_captions(captions).input_ids
        ids = pad_sequences([[self.start_id, *b] for b in body], self.tokenizer.pad_token_id)
        mask = pad_sequences([[1] * (len(b) + 1) for b in body], 0)
        labels = pad_sequences([[-100, *b] for b in body], -100)
        return ids.to(device), mask.to(device), labels.to(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of [start, caption...] ids, the start's being the trained one."""
        rest = self.lm.get_input_embeddings()(ids[:, 1:])
        return torch.cat([self.start.expand(len(ids), -1, -1).to(rest.dtype), rest], 1)

    def loss(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask, labels = self.tokenize(captions, grid.device)
        vision = self.vision(grid)
        with self.attending(vision if rows is None else vision[rows]):
            return self.lm(inputs_embeds=self.embed(ids), attention_mask=mask, labels=labels).loss

    def logits(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Teacher-forced next-token logits [B, T, V] for the tokenised captions."""
        ids, mask, _ = self.tokenize(captions, grid.device)
        with self.attending(self.vision(grid)):
            return self.lm(inputs_embeds=self.embed(ids), attention_mask=mask).logits

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[str]:
        """HF generate from the start token (sampling seeded from ``generator``)."""
        beams = decoding.beam_size if decoding.strategy == "beam" else 1
        # generate expands each row num_beams times, item-major: expand the vision tokens alike
        with self.attending(self.vision(grid).repeat_interleave(beams, 0)):
            return self.generate_after(self.start.expand(len(grid), -1, -1), decoding, generator, use_cache)

    def sample_with_logprobs(self, grid: torch.Tensor, k: int, max_len: int,
                             generator: torch.Generator | None = None) -> Samples:
        """k captions sampled per image (rows item-major) with their summed log-probabilities,
        which carry gradients (self-critical training; models/sampling.py)."""
        rows = len(grid) * k
        with self.attending(self.vision(grid).repeat_interleave(k, 0)):
            start = self.start.expand(rows, -1, -1).to(self.lm.get_input_embeddings().weight.dtype)
            return sample_after_embeds(self, start, 1, max_len, generator)


@register_variant("cross_attention_lm", family="captioning", config=CrossAttentionLMConfig)
def build_cross_attention_lm(cfg: CrossAttentionLMConfig, image_dim: int, n_grid: int, *, vocab=None,
                             pixels: bool = False) -> CrossAttentionLMCaptioner:
    return CrossAttentionLMCaptioner(cfg, image_dim, n_grid, create_language_model(cfg.language_model))
