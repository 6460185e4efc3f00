"""What the stages, commands, inference.py and the benchmarks use of a variant model, by family.

Every variant model is an ``nn.Module`` (train/eval, parameters, state_dict come from there) and
follows its family's protocol below; tests/test_variants.py checks each registered model against
it. Code outside models/ should call nothing else on a model.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .reranker import CrossAttentionReranker, ScanMatcher


@runtime_checkable
class AlignmentModel(Protocol):
    """Images and captions embedded into one space (family ``alignment``)."""

    cfg: object  # the variant's validated params
    image_encoder: torch.nn.Module | None  # None: it reads cached token grids; else pixels, through this encoder
    reranker: CrossAttentionReranker | ScanMatcher | None  # re-orders each query's top-k when present

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Cached token grids pass through; pixels go through the model's image encoder."""

    def embed_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, T, C] -> L2-normalised embeddings [B, E]."""

    def text_tokens(self, captions: list[str], device, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder token states [B, L, D] and attention mask [B, L]."""

    def pool_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states -> pooled text features [B, D] (cacheable when the text encoder is frozen)."""

    def text_features(self, captions: list[str], device) -> torch.Tensor:
        """``pool_text(*text_tokens(captions))``."""

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled text features -> L2-normalised embeddings [B, E]."""

    def scale(self) -> torch.Tensor:
        """The (clamped) logit scale: 1 / temperature."""

    def loss(self, images: torch.Tensor, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None,
             text_mask: torch.Tensor | None = None, global_batch: bool = False,
             image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of matched (image, caption) pairs on this process (``image_ids``: the
        image of each pair, when an image may appear in several)."""

    def forward(self, images: torch.Tensor, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss over the global batch (the entry point of DDP and torch.compile)."""


@runtime_checkable
class CaptioningModel(Protocol):
    """Captions generated from image token grids (family ``captioning``)."""

    cfg: object  # the variant's validated params; ``cfg.decoding`` is its default decoding

    def loss(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of ``captions`` given their images' token grids: caption i's
        image is ``grid[rows[i]]`` (each distinct image encoded once), or ``grid[i]`` without ``rows``."""

    def forward(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """``loss`` (the entry point of DDP and torch.compile)."""

    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[str]:
        """One caption per image; ``decoding`` a config.DecodingConfig, sampling drawn from ``generator``."""

    def sample_with_logprobs(self, grid: torch.Tensor, k: int, max_len: int, generator: torch.Generator | None = None):
        """k captions sampled per image from the full distribution (rows item-major), as a
        models.sampling.Samples: token ids, texts, and summed log-probabilities with gradients."""


FAMILIES: dict[str, type] = {"alignment": AlignmentModel, "captioning": CaptioningModel}
