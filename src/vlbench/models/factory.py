"""Build a variant's model from its config, and rebuild a trained one from its folder.

A trained model folder holds ``model.safetensors`` (trainable weights only: frozen pretrained
parts are reloaded from the registry), ``config.json`` (the variant's params plus what the
data decided: feature sizes, vocabulary) and ``run_id`` (its MLflow run).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..config import build_variant
from . import registry
from .alignment import DualEncoder
from .captioning import BPEVocabulary, GridTransformerCaptioner, VisionPrefixCaptioner, Vocabulary


def build_model(cfg, image_dim: int, n_grid: int, vocab: list[str] | None = None, pixels: bool = False) -> nn.Module:
    """``pixels``: the model takes images, not cached token grids, and holds its image encoder."""
    if cfg.model == "dual_encoder":
        image_encoder = registry.create_image_encoder(cfg.image_encoder) if pixels else None
        text_encoder = registry.create_text_encoder(cfg.text_encoder, cfg.attention_window, cfg.max_text_len)
        return DualEncoder(cfg, image_dim, n_grid, text_encoder, image_encoder)
    if cfg.model == "grid_transformer":
        if cfg.tokenizer == "gpt2_bpe":
            return GridTransformerCaptioner(cfg, image_dim, n_grid, BPEVocabulary())
        if vocab is None:
            raise ValueError("grid_transformer needs a vocabulary")
        return GridTransformerCaptioner(cfg, image_dim, n_grid, Vocabulary(vocab))
    if cfg.model == "vision_prefix":
        return VisionPrefixCaptioner(cfg, image_dim, registry.create_language_model(cfg.language_model))
    if cfg.model == "cross_attention_lm":
        from .cross_attention_lm import CrossAttentionLMCaptioner

        return CrossAttentionLMCaptioner(cfg, image_dim, n_grid, registry.create_language_model(cfg.language_model))
    raise ValueError(f"no builder for model {cfg.model!r}")


def trainable_state(model: nn.Module) -> dict:
    fn = getattr(model, "trainable_state_dict", None)
    return fn() if fn else model.state_dict()


def save_trained(model: nn.Module, folder: Path, name: str, raw_cfg: dict, extra: dict) -> None:
    from .. import io

    state = {k: v.detach().contiguous().cpu() for k, v in trainable_state(model).items()}
    with io.atomic_path(folder / "model.safetensors") as tmp:
        # tied weights share storage; safetensors wants one name per tensor
        seen, unique = set(), {}
        for k, v in state.items():
            if v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            unique[k] = v
        save_file(unique, str(tmp))
    io.write_json(folder / "config.json", {"variant": name, "params": raw_cfg, **extra})


def load_trained(folder: str | Path):
    """-> (model in eval mode, variant config, saved extras)."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    cfg = build_variant(meta["variant"], meta["params"])
    model = build_model(cfg, meta["image_dim"], meta["n_grid"], meta.get("vocab"), pixels=meta.get("input") == "pixels")
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    own = set(trainable_state(model))
    if unexpected or (own & set(missing)) - _tied(model):
        raise RuntimeError(f"{folder}: checkpoint does not match the model ({sorted(own & set(missing))[:3]} missing)")
    return model.eval(), cfg, meta


def _tied(model: nn.Module) -> set[str]:
    return {"out.weight"} if isinstance(model, GridTransformerCaptioner) else set()
