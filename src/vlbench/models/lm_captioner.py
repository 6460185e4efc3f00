"""What the captioners on a pretrained causal LM (vision_prefix, cross_attention_lm) share: the LM
and its tokenizer, frozen unless told otherwise; captions tokenised as " caption<eos>"; decoding
through the LM's own ``generate`` (its KV cache) after some input embeddings; and a checkpoint
without the frozen LM's weights, which reload from the registry."""
from __future__ import annotations

import torch
from torch import nn

from .components import LanguageModel
from .hf_generate import global_rng_from, hf_generate_kwargs


class LMCaptioner(nn.Module):
    def __init__(self, cfg, lm: LanguageModel, lm_trainable: bool = False):
        super().__init__()
        self.cfg, self.lm_trainable = cfg, lm_trainable
        self.lm, self.tokenizer = lm.model, lm.tokenizer
        self.lm.requires_grad_(lm_trainable)

    def tokenize_captions(self, captions: list[str], **kwargs):
        """The LM tokenizer on " caption<eos>" (a leading space: words mid-sentence), truncated to
        ``cfg.max_len`` tokens; ``kwargs`` go to the tokenizer (padding, return_tensors)."""
        tok = self.tokenizer
        return tok([" " + c + tok.eos_token for c in captions], truncation=True, max_length=self.cfg.max_len,
                   add_special_tokens=False, **kwargs)

    def forward(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss (DDP's entry point: it synchronises gradients of what forward computes)."""
        return self.loss(grid, captions, rows)

    @torch.no_grad()
    def generate_after(self, embeds: torch.Tensor, decoding, generator: torch.Generator | None,
                       use_cache: bool) -> list[str]:
        """HF generate continuing the input embeddings ``embeds`` [B, T, D] (sampling seeded from
        ``generator``) -> the new tokens of each row, decoded."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        with global_rng_from(generator):
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask,
                                   **hf_generate_kwargs(decoding, self.tokenizer, use_cache))
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.lm_trainable or not k.startswith("lm.")}
