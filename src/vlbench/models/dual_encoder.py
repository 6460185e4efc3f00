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
from .components import transformer_layers
from .contrastive import max_violation_loss, multi_positive_loss, same_image
from .pooling import image_pool, pool_tokens
from .registry import (IMAGE_STAGES, TEXT_LAYERS, check_image_encoder, check_text_encoder, create_image_encoder, create_text_encoder,
                       gives_cnn_grid)
from .reranker import RerankerConfig, create_reranker
from .variant_registry import register_variant


@dataclass
class DualEncoderConfig(VariantConfig):
    """CLIP-style: cached image features + text encoder, projection heads, InfoNCE."""

    text_encoder: str = "minilm_l6"
    text_pooling: Literal["cls", "mean"] = "mean"
    # cls: ViT encoders only (a CNN grid has no CLS token); attention: a learned query over the
    # tokens (starts as mean); gem: generalised mean, learnable exponent (non-negative CNN grids)
    image_pooling: Literal["cls", "mean", "attention", "gem"] = "mean"
    text_tuning: Literal["frozen", "full", "lora"] = "frozen"
    # full / lora: tune only the top n transformer layers (0 = all); the frozen ones below run
    # without autograd (nothing there needs a gradient) and without dropout
    text_tune_layers: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_text_len: int = 32
    attention_window: int = 16  # Longformer encoders only: tokens in the sliding window (even)
    embed_dim: int = 256
    head: Literal["linear", "mlp"] = "mlp"
    dropout: float = 0.1
    init_temperature: float = 0.07
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    # infonce: symmetric InfoNCE; multi_positive: the captions of one image in a batch are all its
    # positives, none another's negative; vse_max_violation: VSE++ hinge on the hardest negative
    loss: Literal["infonce", "multi_positive", "vse_max_violation"] = "infonce"
    hard_negative_beta: float = 0.0  # infonce / multi_positive: negatives weighted by e^(beta x logit) (Robinson et al.)
    margin: float = 0.2  # vse_max_violation: the cosine margin
    captions_per_image: int = 1  # distinct captions drawn per sampled image each step (> 1: not with infonce)
    # pixel_variants only: tune the image encoder end to end, on images resized to image_size; top:
    # only its last image_tune_stages stages and head conv, over the frozen stages' maps computed once
    image_tuning: Literal["frozen", "full", "lora", "top"] = "frozen"
    image_tune_stages: int = 1
    image_lora: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules=["conv_pw", "conv_pwl"]))
    image_size: int | Literal["native"] = 128  # native: the image encoder's own resolution
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, p):
        positive(p, self, "max_text_len", "embed_dim", "init_temperature", "margin", "captions_per_image")
        if self.image_size != "native":
            positive(p, self, "image_size")
        if self.attention_window <= 0 or self.attention_window % 2:
            raise ParamError(f"{p}.attention_window: must be even and > 0, got {self.attention_window}")
        in_range(p, self, "dropout", 0.0, 0.9)
        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_text_encoder(f"{p}.text_encoder", self.text_encoder)
        if self.image_pooling == "cls" and gives_cnn_grid(self.image_encoder):
            raise ParamError(f"{p}.image_pooling: {self.image_encoder} gives a CNN grid, which has no CLS token; use mean")
        if self.text_tune_layers < 0:
            raise ParamError(f"{p}.text_tune_layers: must be >= 0 (0 = all layers), got {self.text_tune_layers}")
        if self.text_tune_layers and self.text_tuning == "frozen":
            raise ParamError(f"{p}.text_tune_layers: needs text_tuning full or lora (the text encoder is frozen)")
        if self.text_tune_layers > TEXT_LAYERS.get(self.text_encoder, self.text_tune_layers):
            raise ParamError(f"{p}.text_tune_layers: {self.text_tune_layers}, but {self.text_encoder} has "
                             f"{TEXT_LAYERS[self.text_encoder]} layers")
        if self.hard_negative_beta < 0:
            raise ParamError(f"{p}.hard_negative_beta: must be >= 0 (0 = off), got {self.hard_negative_beta}")
        if self.hard_negative_beta and self.loss == "vse_max_violation":
            raise ParamError(f"{p}.hard_negative_beta: weights InfoNCE's negatives; vse_max_violation takes "
                             f"the hardest one already")
        positive(p, self, "image_tune_stages")
        if self.image_tune_stages != 1 and self.image_tuning != "top":
            raise ParamError(f"{p}.image_tune_stages: needs image_tuning: top (it is {self.image_tuning})")
        if self.image_tune_stages >= IMAGE_STAGES.get(self.image_encoder, self.image_tune_stages + 1):
            raise ParamError(f"{p}.image_tune_stages: {self.image_tune_stages}, but {self.image_encoder} has "
                             f"{IMAGE_STAGES[self.image_encoder]} stages (at most {IMAGE_STAGES[self.image_encoder] - 1}: one stays frozen)")
        if self.image_tuning == "top" and self.image_encoder.startswith("hf/"):
            raise ParamError(f"{p}.image_tuning: top tunes a CNN's last stage (EfficientNet, timm ResNet); "
                             f"{self.image_encoder} is a transformer: use lora or full")
        if self.captions_per_image > 1 and self.loss == "infonce":
            raise ParamError(f"{p}.captions_per_image: {self.captions_per_image} captions of an image would be each "
                             f"other's negatives under loss infonce: use multi_positive or vse_max_violation")



class _Passthrough(nn.Module):
    """Stands in for a text encoder's embeddings: what comes in as ``inputs_embeds`` (keyword, as
    BERT passes it, or second positional argument, as DistilBERT does) goes on unchanged."""

    def forward(self, *args, inputs_embeds=None, **_):
        return inputs_embeds if inputs_embeds is not None else args[1]


def top_layers_view(text_model: nn.Module, layers_name: str, tuned: list[int]) -> nn.Module:
    """A shallow copy of ``text_model`` whose embeddings pass their input through and whose layer
    stack holds only the ``tuned`` layers (the same modules: gradients reach the real weights).
    Called with ``inputs_embeds`` = the frozen layers' output and the attention mask, it runs the
    encoder's own forward (its own attention-mask handling) over the tuned layers alone."""
    import copy

    def shallow(module: nn.Module) -> nn.Module:
        c = copy.copy(module)
        c._modules = dict(module._modules)  # a copy's submodules can be replaced without touching the original's
        return c

    view = shallow(text_model)
    view.embeddings = _Passthrough()
    *path, last = layers_name.split(".")
    parent = view
    for name in path:  # e.g. encoder.layer: copy the chain down to the stack's parent
        child = shallow(getattr(parent, name))
        setattr(parent, name, child)
        parent = child
    stack = getattr(parent, last)
    setattr(parent, last, nn.ModuleList([stack[i] for i in tuned]))
    return view


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
        self.image_bottom = self.image_top = None  # image_tuning: top (not submodules: image_encoder holds them)
        if image_encoder is not None:
            image_encoder.requires_grad_(cfg.image_tuning == "full")
            if cfg.image_tuning == "top":
                try:
                    bottom, top = image_encoder.split_top(cfg.image_tune_stages)
                except ValueError as e:
                    raise ParamError(f"image_tune_stages: {cfg.image_encoder}: {e}") from None
                object.__setattr__(self, "image_bottom", bottom)
                object.__setattr__(self, "image_top", top.requires_grad_(True))
            if cfg.image_tuning == "lora":
                from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

                lora = cfg.image_lora
                inject_adapter_in_model(PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=lora.target_modules), image_encoder.backbone)
            # NHWC convolutions: 1.33x a Lite2 forward, 1.38x a LoRA step on CPU (benchmarks/pixel_path.py);
            # image_tokens hands it channels-last inputs
            image_encoder.to(memory_format=torch.channels_last)
        self.image_pool = image_pool(cfg.image_pooling, image_dim)
        self.image_head = ProjectionHead(image_dim, cfg.embed_dim, cfg.head, cfg.dropout)
        self.text_head = ProjectionHead(text_encoder.dim, cfg.embed_dim, cfg.head, cfg.dropout)
        self.tokenizer = text_encoder.tokenizer
        self.text_model = text_encoder.model
        self.text_model.requires_grad_(cfg.text_tuning == "full")
        # text_tune_layers: n: the bottom layers and the embeddings stay frozen (in eval mode)
        layers_name, layers = transformer_layers(self.text_model) if cfg.text_tune_layers else ("", [])
        if cfg.text_tune_layers > len(layers):
            raise ParamError(f"text_tune_layers: {cfg.text_tune_layers}, but {cfg.text_encoder} has {len(layers)} layers")
        tuned = list(range(len(layers) - cfg.text_tune_layers, len(layers)))
        self.text_frozen_parts = [m for m in (getattr(self.text_model, "embeddings", None), *layers[: len(layers) - len(tuned)])
                                  if m is not None]
        self.text_tuned_prefixes = tuple(f"text_model.{layers_name}.{i}." for i in tuned)
        if cfg.text_tuning == "full" and tuned:
            self.text_model.requires_grad_(False)
            for i in tuned:
                layers[i].requires_grad_(True)
        # full tuning of the top layers: the frozen layers' output can be computed once per caption
        # (training.TunedTextCache) and each step runs only the tuned layers on it
        self.text_top = None
        if cfg.text_tuning == "full" and tuned:
            object.__setattr__(self, "text_top", top_layers_view(self.text_model, layers_name, tuned))  # not a submodule
        self.text_first_tuned = len(layers) - len(tuned)
        if cfg.text_tuning == "lora":
            from peft import LoraConfig as PeftLoraConfig, get_peft_model

            lora = cfg.lora
            where = {"layers_to_transform": tuned, "layers_pattern": layers_name.split(".")[-1]} if tuned else {}
            self.text_model = get_peft_model(self.text_model, PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, **where))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.logit_scale.requires_grad_(cfg.loss != "vse_max_violation")  # VSE++ compares cosines to a margin
        self.reranker = None
        if cfg.reranker.top_k:
            self.reranker = create_reranker(text_encoder.dim, image_dim, n_grid, cfg.reranker)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.MAX_LOGIT_SCALE)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.text_tuning == "frozen":
            self.text_model.eval()  # a frozen encoder keeps its dropout off
        for part in self.text_frozen_parts:  # and so do the frozen layers under the tuned ones
            part.eval()
        if self.image_encoder is not None:
            self.image_encoder.eval()  # BatchNorm keeps its pretraining statistics: our batches are small
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Cached token grids pass through; pixels go through the (tuned) image encoder. Under
        ``image_tuning: top`` the input may also be the frozen bottom's maps (``inputs.FrozenBottom``:
        computed once per image), which only the top runs on."""
        if self.image_encoder is None:
            return images
        images = images.contiguous(memory_format=torch.channels_last)
        if self.image_top is not None:
            if images.shape[1] == 3:  # pixels (the bottom's maps have its width: 208 channels for Lite2)
                with torch.no_grad():
                    images = self.image_bottom(images)
            return self.image_top(images).flatten(2).transpose(1, 2)
        with torch.set_grad_enabled(self.cfg.image_tuning != "frozen" and torch.is_grad_enabled()):
            return self.image_encoder(images)

    def embed_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, T, C] (a CNN grid or ViT tokens) -> pooled -> normalised embeddings."""
        return F.normalize(self.image_head(self.image_pool(tokens.float())), dim=-1)

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

    @torch.no_grad()
    def text_frozen_states(self, captions: list[str], device, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input of the first tuned layer [B, pad_to, D] (the frozen layers' output, in eval
        mode as in training) and the attention mask; for ``text_top``."""
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=pad_to,
                               return_tensors="pt").to(device)
        out = self.text_model(**batch, output_hidden_states=True)
        return out.hidden_states[self.text_first_tuned], batch["attention_mask"]

    def text_tokens_from_frozen(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states from the frozen layers' output: only the tuned
        layers run (with gradients in training)."""
        return self.text_top(inputs_embeds=states, attention_mask=mask).last_hidden_state

    def pool_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool_tokens(tokens.float(), mask, self.cfg.text_pooling)

    def text_features(self, captions: list[str], device) -> torch.Tensor:
        """Pooled text-encoder output before the head (cacheable when the encoder is frozen)."""
        return self.pool_text(*self.text_tokens(captions, device))

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)

    def forward(self, images: torch.Tensor, text_pooled: torch.Tensor,
                text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss (DDP's entry point): on many processes the contrastive batch is the
        global batch, every rank's embeddings gathered, so it equals the one-process loss."""
        return self.loss(images, text_pooled, text_tokens, text_mask, global_batch=True, image_ids=image_ids)

    def loss(self, images: torch.Tensor, text_pooled: torch.Tensor,
             text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
             global_batch: bool = False, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Contrastive loss, plus the re-ranker's matching loss on hard negatives when it has one
        (it needs the caption's token states). ``images``: cached token grids or pixels.
        ``global_batch``: contrast against all ranks' pairs (the re-ranker's hard negatives stay
        this rank's own: its token states are not gathered). ``image_ids`` [B]: which image each
        pair shows (with ``captions_per_image`` > 1 an image appears in several pairs)."""
        image_tokens = self.image_tokens(images)
        img, txt = self.embed_images(image_tokens), self.embed_text_features(text_pooled)
        if global_batch:
            from ..distributed import gather

            loss = self.contrast(gather(img), gather(txt), None if image_ids is None else gather(image_ids))
        else:
            loss = self.contrast(img, txt, image_ids)
        if self.reranker is not None:
            logits = (self.scale() * img @ txt.t()).detach()
            if image_ids is not None and self.cfg.captions_per_image > 1:  # no other caption of the image as a negative
                logits = logits.masked_fill(same_image(image_ids) & ~torch.eye(len(logits), dtype=torch.bool,
                                                                                device=logits.device), float("-inf"))
            matching = self.reranker.loss(logits, text_tokens, text_mask, image_tokens, image_ids)
            loss = loss + self.cfg.reranker.itm_weight * matching
        return loss

    def contrast(self, img: torch.Tensor, txt: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
        """The alignment loss of ``cfg.loss`` on a batch of embedded pairs (models/contrastive.py)."""
        cfg = self.cfg
        if cfg.loss == "infonce" and not cfg.hard_negative_beta:
            return contrastive_loss(img, txt, self.scale())
        if cfg.loss == "infonce" or image_ids is None:  # infonce: the matched pair is the only positive
            positives = torch.eye(len(img), dtype=torch.bool, device=img.device)
        else:
            positives = same_image(image_ids.to(img.device))
        if cfg.loss == "vse_max_violation":
            return max_violation_loss(img, txt, positives, cfg.margin)
        return multi_positive_loss(img, txt, self.scale(), positives, cfg.hard_negative_beta)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: heads, temperature and re-ranker, plus what of each encoder
        was trained (all of it, or only the LoRA matrices); frozen weights reload from the registry."""
        def tuned(tuning: str, k: str) -> bool:
            return tuning == "full" or (tuning == "lora" and "lora_" in k)

        def keep(k: str, v: torch.Tensor) -> bool:
            if k.startswith("text_model."):  # text_tune_layers: only the layers it tuned
                return tuned(self.cfg.text_tuning, k) and (not self.cfg.text_tune_layers or "lora_" in k
                                                           or k.startswith(self.text_tuned_prefixes))
            if k.startswith("image_encoder."):
                return tuned(self.cfg.image_tuning, k) or id(v) in top
            return True

        state = self.state_dict(keep_vars=True)
        top = {id(v) for v in self.image_top.state_dict(keep_vars=True).values()} if self.image_top is not None else set()
        return {k: v.detach() for k, v in state.items() if keep(k, v)}


@register_variant("dual_encoder", family="alignment", config=DualEncoderConfig, pixels=True)
def build_dual_encoder(cfg: DualEncoderConfig, image_dim: int, n_grid: int, *, vocab=None,
                       pixels: bool = False) -> DualEncoder:
    image_encoder = create_image_encoder(cfg.image_encoder) if pixels else None
    text_encoder = create_text_encoder(cfg.text_encoder, cfg.attention_window, cfg.max_text_len)
    return DualEncoder(cfg, image_dim, n_grid, text_encoder, image_encoder)
