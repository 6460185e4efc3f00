"""The whole params.yaml at once: every section, every variant against its model's schema, and the
rules across them (a cached-features variant's image encoder must be a features backbone; only
models that can train from pixels under ``pixel_variants``). `vlbench check` and the first stage
run it before any work. It needs every variant model's schema, so the stages that read one section
only (split, report) do not import it."""
from __future__ import annotations

from .errors import ParamError
from .params import SECTIONS, VARIANT_GROUPS, section


def validate_all(raw: dict) -> None:
    """Check every section and variant; used by `vlbench check` and the first stage."""
    from .models.variants import build_variant, variant_models  # imports torch: not for `download --help`

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
        if not variant_models()[v.model].pixels:
            from_pixels = ", ".join(m for m, spec in variant_models().items() if spec.pixels)
            raise ParamError(f"pixel_variants.{name}.model: only {from_pixels} trains from pixels so far")
