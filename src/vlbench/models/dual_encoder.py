"""``dual_encoder``: a CLIP-style dual encoder over cached image tokens (or pixels, through its own
image encoder) and a (frozen or trainable) text encoder."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig, OptimConfig, VariantConfig, in_range, positive
from ..errors import ParamError
from .registry import check_image_encoder, check_text_encoder, create_image_encoder, create_text_encoder
from .reranker import CrossAttentionReranker, RerankerConfig, itm_loss
from .variant_registry import register_variant


@dataclass
class DualEncoderConfig(VariantConfig):
    """CLIP-style: cached image features + text encoder, projection heads, InfoNCE."""

    text_encoder: str = "minilm_l6"
    text_pooling: Literal["cls", "mean"] = "mean"
    image_pooling: Literal["cls", "mean"] = "mean"  # cls: ViT encoders only (a CNN grid has no CLS token)
    text_tuning: Literal["frozen", "full", "lora"] = "frozen"
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_text_len: int = 32
    attention_window: int = 16  # Longformer encoders only: tokens in the sliding window (even)
    embed_dim: int = 256
    head: Literal["linear", "mlp"] = "mlp"
    dropout: float = 0.1
    init_temperature: float = 0.07
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    # pixel_variants only: tune the image encoder end to end, on images resized to image_size
    image_tuning: Literal["frozen", "full", "lora"] = "frozen"
    image_lora: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules=["conv_pw", "conv_pwl"]))
    image_size: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, p):
        positive(p, self, "max_text_len", "embed_dim", "init_temperature", "image_size")
        if self.attention_window <= 0 or self.attention_window % 2:
            raise ParamError(f"{p}.attention_window: must be even and > 0, got {self.attention_window}")
        in_range(p, self, "dropout", 0.0, 0.9)
        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_text_encoder(f"{p}.text_encoder", self.text_encoder)
        if self.image_pooling == "cls" and self.image_encoder == "efficientnet_lite0":
            raise ParamError(f"{p}.image_pooling: {self.image_encoder} gives a CNN grid, which has no CLS token; use mean")



class ProjectionHead(nn.Module):
    """``linear``: one matrix. ``mlp``: linear -> GELU -> linear, dropout, residual, LayerNorm
    (the head of the popular Flickr8k CLIP tutorial)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", dropout: float = 0.1):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(in_dim, out_dim)
        if kind == "mlp":
            self.fc = nn.Linear(out_dim, out_dim)
            self.drop = nn.Dropout(dropout)
            self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        h = self.proj(x)
        if self.kind == "mlp":
            h = self.norm(h + self.drop(self.fc(F.gelu(h))))
        return h


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """``cls``: the first token. ``mean``: average of the tokens the mask keeps."""
    if how == "cls":
        return tokens[:, 0]
    if mask is None:
        return tokens.mean(1)
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1e-6)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image, text) pairs, embeddings L2-normalised."""
    logits = logit_scale * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class DualEncoder(nn.Module):
    MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: temperature never below 0.01

    def __init__(self, cfg, image_dim: int, n_grid: int, text_encoder, image_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        # None: inputs are cached token grids. Otherwise inputs are pixels and the encoder is part
        # of the model, frozen, fully tuned or LoRA-tuned (peft adapters injected into its convs).
        self.image_encoder = image_encoder
        if image_encoder is not None:
            image_encoder.requires_grad_(cfg.image_tuning == "full")
            if cfg.image_tuning == "lora":
                from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

                lora = cfg.image_lora
                inject_adapter_in_model(PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=lora.target_modules), image_encoder.backbone)
        self.image_head = ProjectionHead(image_dim, cfg.embed_dim, cfg.head, cfg.dropout)
        self.text_head = ProjectionHead(text_encoder.dim, cfg.embed_dim, cfg.head, cfg.dropout)
        self.tokenizer = text_encoder.tokenizer
        self.text_model = text_encoder.model
        self.text_model.requires_grad_(cfg.text_tuning == "full")
        if cfg.text_tuning == "lora":
            from peft import LoraConfig as PeftLoraConfig, get_peft_model

            lora = cfg.lora
            self.text_model = get_peft_model(self.text_model, PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.reranker = None
        if cfg.reranker.top_k:
            self.reranker = CrossAttentionReranker(text_encoder.dim, image_dim, n_grid, cfg.reranker)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.MAX_LOGIT_SCALE)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.text_tuning == "frozen":
            self.text_model.eval()  # a frozen encoder keeps its dropout off
        if self.image_encoder is not None:
            self.image_encoder.eval()  # BatchNorm keeps its pretraining statistics: our batches are small
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Cached token grids pass through; pixels go through the (tuned) image encoder."""
        if self.image_encoder is None:
            return images
        with torch.set_grad_enabled(self.cfg.image_tuning != "frozen" and torch.is_grad_enabled()):
            return self.image_encoder(images)

    def embed_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, T, C] (a CNN grid or ViT tokens) -> pooled -> normalised embeddings."""
        return F.normalize(self.image_head(pool_tokens(tokens.float(), None, self.cfg.image_pooling)), dim=-1)

    def text_tokens(self, captions: list[str], device, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder token states [B, L, D] and attention mask [B, L] (``pad_to``: a fixed L,
        so that cached batches stack)."""
        padding = "max_length" if pad_to else True
        batch = self.tokenizer(
            captions, padding=padding, truncation=True, max_length=pad_to or self.cfg.max_text_len, return_tensors="pt"
        ).to(device)
        with torch.set_grad_enabled(self.cfg.text_tuning != "frozen" and torch.is_grad_enabled()):
            hidden = self.text_model(**batch).last_hidden_state
        return hidden, batch["attention_mask"]

    def pool_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool_tokens(tokens.float(), mask, self.cfg.text_pooling)

    def text_features(self, captions: list[str], device) -> torch.Tensor:
        """Pooled text-encoder output before the head (cacheable when the encoder is frozen)."""
        return self.pool_text(*self.text_tokens(captions, device))

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)

    def forward(self, images: torch.Tensor, text_pooled: torch.Tensor,
                text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss (DDP's entry point): on many processes the contrastive batch is the
        global batch, every rank's embeddings gathered, so it equals the one-process loss."""
        return self.loss(images, text_pooled, text_tokens, text_mask, global_batch=True)

    def loss(self, images: torch.Tensor, text_pooled: torch.Tensor,
             text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
             global_batch: bool = False) -> torch.Tensor:
        """Contrastive loss, plus the re-ranker's matching loss on hard negatives when it has one
        (it needs the caption's token states). ``images``: cached token grids or pixels.
        ``global_batch``: contrast against all ranks' pairs (the re-ranker's hard negatives stay
        this rank's own: its token states are not gathered)."""
        image_tokens = self.image_tokens(images)
        img, txt = self.embed_images(image_tokens), self.embed_text_features(text_pooled)
        if global_batch:
            from ..distributed import gather

            loss = contrastive_loss(gather(img), gather(txt), self.scale())
        else:
            loss = contrastive_loss(img, txt, self.scale())
        if self.reranker is not None:
            logits = (self.scale() * img @ txt.t()).detach()
            loss = loss + self.cfg.reranker.itm_weight * itm_loss(self.reranker, logits, text_tokens, text_mask, image_tokens)
        return loss

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: heads, temperature and re-ranker, plus what of each encoder
        was trained (all of it, or only the LoRA matrices); frozen weights reload from the registry."""
        def tuned(tuning: str, k: str) -> bool:
            return tuning == "full" or (tuning == "lora" and "lora_" in k)

        def keep(k: str) -> bool:
            if k.startswith("text_model."):
                return tuned(self.cfg.text_tuning, k)
            if k.startswith("image_encoder."):
                return tuned(self.cfg.image_tuning, k)
            return True

        return {k: v for k, v in self.state_dict().items() if keep(k)}


@register_variant("dual_encoder", family="alignment", config=DualEncoderConfig, pixels=True)
def build_dual_encoder(cfg: DualEncoderConfig, image_dim: int, n_grid: int, *, vocab=None,
                       pixels: bool = False) -> DualEncoder:
    image_encoder = create_image_encoder(cfg.image_encoder) if pixels else None
    text_encoder = create_text_encoder(cfg.text_encoder, cfg.attention_window, cfg.max_text_len)
    return DualEncoder(cfg, image_dim, n_grid, text_encoder, image_encoder)
