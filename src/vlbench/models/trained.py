"""Save a trained variant's model to its folder, and rebuild it from there.

A trained model folder holds ``model.safetensors`` (trainable weights only: frozen pretrained
parts are reloaded from the registry), ``config.json`` (the variant's params plus what the
data decided: feature sizes, vocabulary), ``run_id`` (its MLflow run) and, for a captioner that
re-ranks its beams by their training neighbours' captions, those (models/consensus.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .. import io
from .consensus import NeighbourCaptions
from .variants import build_variant, create_variant_model


def trainable_state(model: nn.Module) -> dict:
    fn = getattr(model, "trainable_state_dict", None)
    return fn() if fn else model.state_dict()


def save_trained(model: nn.Module, folder: Path, name: str, raw_cfg: dict, extra: dict) -> None:
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
    if getattr(model, "neighbours", None) is not None:
        model.neighbours.save(folder)
    io.write_json(folder / "config.json", {"variant": name, "params": raw_cfg, **extra})


def load_trained(folder: str | Path):
    """-> (model in eval mode, variant config, saved extras)."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    cfg = build_variant(meta["variant"], meta["params"])
    model = create_variant_model(cfg, meta["image_dim"], meta["n_grid"], meta.get("vocab"), pixels=meta.get("input") == "pixels")
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    own = set(trainable_state(model))
    if unexpected or (own & set(missing)) - getattr(model, "tied_weights", set()):
        raise RuntimeError(f"{folder}: checkpoint does not match the model ({sorted(own & set(missing))[:3]} missing)")
    if hasattr(model, "neighbours"):
        model.neighbours = NeighbourCaptions.load(folder)
    return model.eval(), cfg, meta
