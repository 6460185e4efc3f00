"""How a variant model joins the table of ``variants.<name>.model``: ``@register_variant`` on its
builder, in the model's own module next to its params dataclass (timm's ``register_model`` idea).
The lookups (raw params -> config -> model) are in models/variants.py, which imports every
model module, so that the table is complete wherever it is read.

A builder is called as ``build(cfg, image_dim, n_grid, vocab=..., pixels=...)``: the validated
params, the width and number of the image tokens it will read, the vocabulary its ``prepare``
made from the training captions (None if it has none), and whether it reads pixels (then it holds
its image encoder) instead of cached token grids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .protocols import FAMILIES


@dataclass(frozen=True)
class VariantModel:
    name: str  # its `model:` in params.yaml
    family: str  # alignment | captioning: the protocol it follows (models/protocols.py) and how stages use it
    config: type  # its params dataclass, a config.VariantConfig
    build: Callable[..., nn.Module]
    pixels: bool = False  # can train end to end from pixels (pixel_variants)
    # (cfg, training captions) -> what the model learns from the data before it is built (e.g. its
    # vocabulary), stored in the model folder's config.json and given back to ``build``
    prepare: Callable[[object, list[str]], dict] | None = None


VARIANT_MODELS: dict[str, VariantModel] = {}


def register_variant(name: str, *, family: str, config: type, pixels: bool = False,
                     prepare: Callable[[object, list[str]], dict] | None = None):
    """Decorator: register the decorated builder as variant model ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"variant model {name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")
    if name in VARIANT_MODELS:
        raise ValueError(f"variant model {name!r} is registered twice")

    def register(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        VARIANT_MODELS[name] = VariantModel(name, family, config, build, pixels, prepare)
        return build

    return register
