"""``vision_prefix``: grid tokens -> MLP -> prefix tokens + a learned [SEP] -> a causal LM (frozen by
default, ClipCap-style); the loss on caption tokens only."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (DecodingConfig, OptimConfig, ScstConfig, VariantConfig, check_lm_captioner_search, in_range,
                      positive)
from .lm_captioner import LMCaptioner
from .sampling import Samples, sample_after_embeds
from .registry import check_image_encoder, check_language_model, create_language_model
from .variant_registry import register_variant


@dataclass
class VisionPrefixConfig(VariantConfig):
    """ClipCap-style: vision features -> MLP -> prefix tokens + learned [SEP] -> frozen causal LM."""

    language_model: str = "smollm2_135m"
    prefix_hidden: int = 1024
    # None: one prefix token per image token (49 for Lite0's grid, 197 for ViT-S/16).
    # k: ClipCap's mapping, the mean image feature -> MLP -> k prefix tokens; a shorter LM sequence.
    prefix_length: int | None = None
    dropout: float = 0.1
    lm_trainable: bool = False
    max_len: int = 40  # LM tokens (subwords), caption + EOS: truncating drops the EOS it must learn
    caption_sampling: Literal["random", "all"] = "random"
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, batch_size=16, steps=150))
    scst: ScstConfig = field(default_factory=ScstConfig)  # self-critical CIDEr-D training after optim.steps

    def check(self, p):
        positive(p, self, "prefix_hidden", "max_len")
        if self.prefix_length is not None:
            positive(p, self, "prefix_length")
        in_range(p, self, "dropout", 0.0, 0.9)
        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_language_model(f"{p}.language_model", self.language_model)
        check_lm_captioner_search(p, self.decoding, self.scst)


class VisionPrefixCaptioner(LMCaptioner):
    def __init__(self, cfg, image_dim: int, lm):
        super().__init__(cfg, lm, lm_trainable=cfg.lm_trainable)
        self.prefix = nn.Sequential(
            nn.Linear(image_dim, cfg.prefix_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.prefix_hidden, lm.dim * (cfg.prefix_length or 1)),
        )
        self.sep = nn.Parameter(torch.randn(1, 1, lm.dim) * 0.02)

    def prefix_embeds(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, T, C] image tokens -> [B, P + 1, D] LM inputs: the prefix, then [SEP]."""
        if self.cfg.prefix_length:
            p = self.prefix(grid.float().mean(1)).view(len(grid), self.cfg.prefix_length, -1)
        else:
            p = self.prefix(grid.float())
        return torch.cat([p, self.sep.expand(len(p), -1, -1)], 1)

    def loss(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        batch = self.tokenize_captions(captions, padding=True, return_tensors="pt").to(grid.device)
        prefix = self.prefix_embeds(grid)
        prefix = prefix if rows is None else prefix[rows]
        tok_emb = self.lm.get_input_embeddings()(batch.input_ids)
        embeds = torch.cat([prefix, tok_emb], 1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=batch.attention_mask.dtype, device=grid.device), batch.attention_mask], 1)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        # Logits only where a caption token is predicted: from [SEP] on. The prefix positions carry
        # no loss, and with a 49-197-token prefix their vocabulary projection was most of the step.
        n = labels.shape[1]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=n + 1).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[str]:
        return self.generate_after(self.prefix_embeds(grid), decoding, generator, use_cache)

    def sample_with_logprobs(self, grid: torch.Tensor, k: int, max_len: int,
                             generator: torch.Generator | None = None) -> Samples:
        """k captions sampled per image (rows item-major) with their summed log-probabilities,
        which carry gradients (self-critical training; models/sampling.py). The prefix runs once per image."""
        return sample_after_embeds(self, self.prefix_embeds(grid), k, max_len, generator)


@register_variant("vision_prefix", family="captioning", config=VisionPrefixConfig)
def build_vision_prefix(cfg: VisionPrefixConfig, image_dim: int, n_grid: int, *, vocab=None,
                        pixels: bool = False) -> VisionPrefixCaptioner:
    return VisionPrefixCaptioner(cfg, image_dim, create_language_model(cfg.language_model))
