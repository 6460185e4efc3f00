"""Stage `train`: train one variant (params `variants.<name>`) on cached features.

Writes ``<out>/model.safetensors``, ``<out>/config.json``, ``<out>/run_id`` and the training
curve ``<curves>`` (CSV: step, loss, lr; a DVC plot). Logs params, per-step loss and learning
rate, and the checkpoint to the variant's MLflow run.

Resume: every ``train.checkpoint_every`` steps (and on SIGTERM) the full training state (trainable
weights, optimizer, step, RNG states, curve so far, MLflow run id) goes to
``checkpoints/<variant>/last.pt``, outside the stage's outs so DVC does not delete it. Running the
stage again with the same params continues from there, in the same MLflow run, and ends with the
same weights as an uninterrupted run. A checkpoint made under other params is ignored.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import io
from ..config import load_params, section, to_flat_dict, variant
from ..models.factory import build_model, save_trained
from ..runtime import fault_point, fingerprint, pick_device, seed_everything
from ..tracking import Tracker
from .features import load_features
from .split import read_manifest


def lr_at(step: int, optim) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    t = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
    return optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Batches:
    """Random images with one of their captions drawn at random, from a seeded generator."""

    def __init__(self, feats: np.ndarray, captions: list[list[str]], batch_size: int, seed: int):
        self.feats, self.captions, self.batch_size = feats, captions, batch_size
        self.rng = random.Random(seed)

    def sample(self):
        idx = sorted(self.rng.sample(range(len(self.feats)), min(self.batch_size, len(self.feats))))
        cap_idx = [self.rng.randrange(len(self.captions[i])) for i in idx]
        return idx, cap_idx


def _captions_by_row(splits_dir: str, split: str, ids: list[str]) -> list[list[str]]:
    df = read_manifest(splits_dir, split)
    by_id = dict(zip(df["image_id"], df["captions"]))
    return [list(by_id[i]) for i in ids]


@torch.no_grad()
def cache_text_features(model, captions: list[list[str]], device, batch_size: int = 256) -> list[torch.Tensor]:
    """Frozen text encoder: encode every caption once instead of every step."""
    flat = [c for caps in captions for c in caps]
    out = []
    for s in tqdm(range(0, len(flat), batch_size), desc="text features", unit="batch"):
        out.append(model.text_features(flat[s : s + batch_size], device).cpu())
    feats = torch.cat(out)
    rows, start = [], 0
    for caps in captions:
        rows.append(feats[start : start + len(caps)])
        start += len(caps)
    return rows


class Checkpoint:
    """The state needed to continue training exactly, loaded without pickle (weights_only)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.path, self.fingerprint = folder / "last.pt", fingerprint

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            print(f"vlbench train: ignoring unreadable checkpoint {self.path} ({type(e).__name__})", file=sys.stderr)
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"vlbench train: {self.path} was made with other params; starting afresh", file=sys.stderr)
            return None
        return state

    def save(self, **state) -> None:
        with io.atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def make_val_loss(model, cfg, features_dir: str, splits_dir: str, cached_text: bool, device, max_images: int = 256):
    """-> a function giving the mean loss over a fixed slice of the val split (first caption of
    each image, fixed batches): comparable across steps, and it draws no random numbers."""
    feats, ids = load_features(features_dir, "val")
    feats, ids = np.array(feats[:max_images]), ids[:max_images]
    captions = [caps[:1] for caps in _captions_by_row(splits_dir, "val", ids)]
    text_cache = cache_text_features(model, captions, device) if cached_text else None
    step_fn = make_step(model, cfg, captions, text_cache, feats, device)
    bs = cfg.optim.batch_size

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        chunks = [list(range(s, min(s + bs, len(ids)))) for s in range(0, len(ids), bs)]
        chunks = [c for c in chunks if len(c) > 1]  # a contrastive batch of one is meaningless
        losses = [step_fn(c, [0] * len(c)).item() * len(c) for c in chunks]
        return sum(losses) / sum(map(len, chunks))

    return val_loss


def make_step(model, cfg, captions, text_cache, feats, device):
    """Return a function batch -> loss for this model family."""
    if cfg.family == "alignment":
        from ..models.alignment import contrastive_loss

        def step(idx, cap_idx):
            img = model.embed_images(torch.from_numpy(feats[idx]).to(device))
            if text_cache is not None:
                t = torch.stack([text_cache[i][j] for i, j in zip(idx, cap_idx)]).to(device)
            else:
                t = model.text_features([captions[i][j] for i, j in zip(idx, cap_idx)], device)
            return contrastive_loss(img, model.embed_text_features(t), model.scale())

        return step

    def step(idx, cap_idx):
        grid = torch.from_numpy(feats[idx]).to(device)
        return model.loss(grid, [captions[i][j] for i, j in zip(idx, cap_idx)])

    return step


def run(params_path: str, name: str, features_dir: str, splits_dir: str, out: str, curves: str,
        checkpoint_dir: str | None = None) -> None:
    raw = load_params(params_path)
    cfg = variant(raw, name)
    tcfg, tracking = section(raw, "train"), section(raw, "tracking")
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    feats, ids = load_features(features_dir, "train")
    captions = _captions_by_row(splits_dir, "train", ids)
    features_meta = json.loads((Path(features_dir) / "meta.json").read_text())
    extra = {"image_dim": int(feats.shape[2]), "n_grid": int(feats.shape[1]), "image_encoder": cfg.image_encoder,
             "image_size": features_meta["image_size"]}
    if cfg.model == "grid_transformer":
        from ..models.captioning import Vocabulary

        extra["vocab"] = Vocabulary.build([c for caps in captions for c in caps], cfg.min_word_count).itos
    model = build_model(cfg, extra["image_dim"], extra["n_grid"], extra.get("vocab")).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    text_cache = None
    if cfg.family == "alignment" and cfg.text_tuning == "frozen":
        model.eval()
        text_cache = cache_text_features(model, captions, device)
    optim = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step_fn = make_step(model, cfg, captions, text_cache, feats, device)
    val_loss = make_val_loss(model, cfg, features_dir, splits_dir, text_cache is not None, device)
    batches = Batches(feats, captions, cfg.optim.batch_size, tcfg.seed)

    ckpt = Checkpoint(Path(checkpoint_dir or f"checkpoints/{name}"),
                      fingerprint(raw["variants"][name], tcfg.seed, features_meta, ids))
    state = ckpt.load()
    start, rows, best_val = 0, [], float("inf")
    run_id_file = out_dir / "run_id"
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        optim.load_state_dict(state["optim"])
        batches.rng.setstate(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, rows, best_val = state["step"], state["rows"], state["best_val_loss"]
        io.write_text(run_id_file, state["run_id"])
        print(f"vlbench train: resuming {name} from step {start}/{cfg.optim.steps}", file=sys.stderr)

    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    with Tracker(tracking.experiment, name, run_id_file, resume=state is not None) as mlflow:
        if state is None:
            mlflow.log_params({**to_flat_dict(cfg), "seed": tcfg.seed, "device": str(device),
                               "trainable_params": n_trainable, "train_images": len(ids)})

        def save_checkpoint(next_step: int) -> None:
            ckpt.save(model={k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable},
                      optim=optim.state_dict(), step=next_step, rows=rows, batch_rng=batches.rng.getstate(),
                      torch_rng=torch.get_rng_state(), run_id=mlflow.run_id, best_val_loss=best_val)

        def train_mode() -> None:
            model.train()
            if text_cache is not None:
                model.text_model.eval()  # frozen encoder: keep dropout off

        def validate(at_step: int) -> None:
            nonlocal best_val
            loss = val_loss()
            best_val = min(best_val, loss)
            mlflow.log_metrics({"val_loss": loss, "best_val_loss": best_val}, step=at_step)
            train_mode()

        trainable = {k for k, v in model.named_parameters() if v.requires_grad} | {k for k, _ in model.named_buffers()}
        t0 = time.perf_counter()
        train_mode()
        bar = tqdm(range(start, cfg.optim.steps), desc=f"train {name}", unit="step", initial=start, total=cfg.optim.steps)
        for step in bar:
            lr = lr_at(step, cfg.optim)
            for g in optim.param_groups:
                g["lr"] = lr
            loss = step_fn(*batches.sample())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            if step % cfg.optim.log_every == 0 or step == cfg.optim.steps - 1:
                rows.append({"step": step, "loss": round(loss.item(), 5), "lr": lr})
                mlflow.log_metrics({"train_loss": loss.item(), "lr": lr}, step=step)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            done = step + 1
            fault_point(done)
            at_checkpoint = tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0
            if at_checkpoint or done == cfg.optim.steps:
                validate(done)
            if (at_checkpoint and done < cfg.optim.steps) or stop["signal"]:
                save_checkpoint(done)
            if stop["signal"]:
                print(f"vlbench train: stopped by signal {stop['signal']} after step {done}; "
                      f"run the stage again to resume", file=sys.stderr)
                raise SystemExit(128 + stop["signal"])
        seconds = time.perf_counter() - t0
        mlflow.log_metrics({"train_seconds": seconds, "train_samples_per_s": (cfg.optim.steps - start) * cfg.optim.batch_size / seconds})
        save_trained(model, out_dir, name, raw["variants"][name], extra)
        with io.atomic_path(curves) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
            w.writeheader()
            w.writerows(rows)
        mlflow.log_artifact(str(out_dir / "model.safetensors"), "checkpoint")
        mlflow.log_artifact(str(out_dir / "config.json"), "checkpoint")
    ckpt.remove()
    print(f"{name}: {cfg.optim.steps} steps in {seconds:.1f}s, final loss {rows[-1]['loss']:.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads variants.<name>, train, tracking)")
    ap.add_argument("--variant", required=True, help="a key of `variants` in params.yaml")
    ap.add_argument("--features", required=True, help="folder of the features stage for the variant's image encoder")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--out", default=None, help="model folder (default models/<variant>)")
    ap.add_argument("--curves", default=None, help="training-curve CSV (default metrics/curves/<variant>.csv)")
    ap.add_argument("--checkpoints", default=None, help="resume folder (default checkpoints/<variant>)")
    a = ap.parse_args(argv)
    run(a.params, a.variant, a.features, a.splits, a.out or f"models/{a.variant}",
        a.curves or f"metrics/curves/{a.variant}.csv", a.checkpoints)
