"""CLIP-style dual encoder over cached image tokens and a (frozen or trainable) text encoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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

    def __init__(self, cfg, image_dim: int, text_encoder):
        super().__init__()
        self.cfg = cfg
        self.image_head = ProjectionHead(image_dim, cfg.embed_dim, cfg.head, cfg.dropout)
        self.text_head = ProjectionHead(text_encoder.dim, cfg.embed_dim, cfg.head, cfg.dropout)
        self.tokenizer = text_encoder.tokenizer
        self.text_model = text_encoder.model
        self.text_model.requires_grad_(cfg.text_tuning == "full")
        if cfg.text_tuning == "lora":
            from peft import LoraConfig, get_peft_model

            lora = cfg.lora
            self.text_model = get_peft_model(self.text_model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.MAX_LOGIT_SCALE)

    def embed_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cached CNN grid tokens [B, T, C] -> normalised embeddings (mean pool: a CNN has no CLS)."""
        return F.normalize(self.image_head(tokens.float().mean(1)), dim=-1)

    def text_features(self, captions: list[str], device) -> torch.Tensor:
        """Pooled text-encoder output before the head (cacheable when the encoder is frozen)."""
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.cfg.max_text_len, return_tensors="pt"
        ).to(device)
        with torch.set_grad_enabled(self.cfg.text_tuning != "frozen" and torch.is_grad_enabled()):
            hidden = self.text_model(**batch).last_hidden_state
        return pool_tokens(hidden, batch["attention_mask"], self.cfg.text_pooling)

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: heads and temperature, plus what of the text encoder was
        trained (all of it, or only the LoRA matrices); frozen weights reload from the registry."""
        tuning = self.cfg.text_tuning

        def keep(k: str) -> bool:
            return not k.startswith("text_model.") or tuning == "full" or (tuning == "lora" and "lora_" in k)

        return {k: v for k, v in self.state_dict().items() if keep(k)}
