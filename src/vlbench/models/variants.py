"""Every variant model (``variants.<name>.model`` in params.yaml) and the lookups from raw params
to a validated config to a model.

Each variant model is one module holding its params dataclass and its builder, registered with
``@register_variant`` (models/variant_registry.py). A new variant model is a new module added to
``MODULES`` below, plus its entry in tests/test_variants.py (which fails until it has one).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..config import build
from ..errors import ParamError
from ..params import variant_group
from . import cross_attention_lm, dual_encoder, grid_transformer, vision_prefix
from .variant_registry import VARIANT_MODELS, VariantModel

# Importing them registers their models; error messages list the models in this order.
MODULES = (dual_encoder, grid_transformer, vision_prefix, cross_attention_lm)


def variant_models() -> dict[str, VariantModel]:
    """Every registered variant model, by name."""
    order = [m.__name__ for m in MODULES]
    for spec in VARIANT_MODELS.values():
        if spec.build.__module__ not in order:
            raise RuntimeError(f"{spec.build.__module__} registers variant model {spec.name!r} but is not "
                               f"in models/variants.py MODULES")
    return dict(sorted(VARIANT_MODELS.items(), key=lambda item: order.index(item[1].build.__module__)))


def build_variant(name: str, raw: Any, group: str = "variants"):
    """The validated params of variant ``name`` of ``group`` (its model's config dataclass).

    ``family`` follows from ``model``: params.yaml may leave it out; when given it must match."""
    prefix = f"{group}.{name}"
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix}: expected a mapping, got {raw!r}")
    models = variant_models()
    model = raw.get("model")
    if model is None:
        raise ParamError(f"{prefix}.model: missing required key (one of: {', '.join(models)})")
    if model not in models:
        raise ParamError(f"{prefix}.model: unknown model {model!r} (one of: {', '.join(models)})")
    spec = models[model]
    family = raw.get("family", spec.family)
    if family != spec.family:
        raise ParamError(f"{prefix}.family: {family!r} is not one of: {spec.family}")
    return build(spec.config, {**raw, "family": spec.family}, prefix)


def variant(raw: dict, name: str):
    """The validated params of variant ``name`` of params.yaml, whichever group holds it."""
    group = variant_group(raw, name)
    return build_variant(name, raw[group][name], group)


def prepare_variant(cfg, captions: list[str]) -> dict:
    """What variant ``cfg`` takes from the training captions before it is built (saved with it)."""
    prepare = variant_models()[cfg.model].prepare
    return prepare(cfg, captions) if prepare else {}


def create_variant_model(cfg, image_dim: int, n_grid: int, vocab: list[str] | None = None,
                         pixels: bool = False) -> nn.Module:
    """The model of validated variant params ``cfg``, for image tokens [n_grid, image_dim].
    ``pixels``: the model takes images, not cached token grids, and holds its image encoder."""
    return variant_models()[cfg.model].build(cfg, image_dim, n_grid, vocab=vocab, pixels=pixels)
