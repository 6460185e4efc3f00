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

import torch
import torch.nn.functional as F
from torch import nn

from .captioning import _merge_heads, _pad, _split_heads, global_rng_from, hf_generate_kwargs


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
        self.memory = None if vision is None else tuple(_split_heads(t, self.heads) for t in self.kv(vision).chunk(2, -1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.memory is None:
            raise RuntimeError("no vision tokens set: run the LM inside CrossAttentionLMCaptioner.attending()")
        keys, values = self.memory
        if keys.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"vision tokens for {keys.shape[0]} rows, LM batch has {hidden.shape[0]}")
        q = _split_heads(self.q(self.norm(hidden)), self.heads)
        attended = _merge_heads(F.scaled_dot_product_attention(q, keys, values))
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


class CrossAttentionLMCaptioner(nn.Module):
    def __init__(self, cfg, image_dim: int, n_grid: int, lm):
        super().__init__()
        self.cfg = cfg
        self.lm, self.tokenizer = lm.model, lm.tokenizer
        self.lm.requires_grad_(False)
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
        tok = self.tokenizer
        body = tok([" " + c + tok.eos_token for c in captions], truncation=True, max_length=self.cfg.max_len,
                   add_special_tokens=False).input_ids
        ids = _pad([[self.start_id, *b] for b in body], tok.pad_token_id)
        mask = _pad([[1] * (len(b) + 1) for b in body], 0)
        labels = _pad([[-100, *b] for b in body], -100)
        return ids.to(device), mask.to(device), labels.to(device)

    def forward(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The training loss (DDP's entry point: it synchronises gradients of what forward computes)."""
        return self.loss(grid, captions)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of [start, caption...] ids, the start's being the trained one."""
        rest = self.lm.get_input_embeddings()(ids[:, 1:])
        return torch.cat([self.start.expand(len(ids), -1, -1).to(rest.dtype), rest], 1)

    def loss(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids, mask, labels = self.tokenize(captions, grid.device)
        with self.attending(self.vision(grid)):
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
        start = self.start.expand(len(grid), -1, -1)
        mask = torch.ones(start.shape[:2], dtype=torch.long, device=grid.device)
        kw = hf_generate_kwargs(decoding, self.tokenizer, use_cache)
        # generate expands each row num_beams times, item-major: expand the vision tokens alike
        with self.attending(self.vision(grid).repeat_interleave(beams, 0)), global_rng_from(generator):
            out = self.lm.generate(inputs_embeds=start, attention_mask=mask, **kw)  # -> the new tokens only
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}
