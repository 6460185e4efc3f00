"""Stage `train`: train one variant (params `variants.<name>` on cached features, or
`pixel_variants.<name>` end to end from the images).

Writes ``<out>/model.safetensors``, ``<out>/config.json``, ``<out>/run_id`` and the training
curve ``<curves>`` (CSV: step, loss, lr; a DVC plot). Logs params, per-step loss and learning
rate, and the checkpoint to the variant's MLflow run.

Resume: every ``train.checkpoint_every`` steps (and on SIGTERM) the full training state (trainable
weights, optimizer, step, RNG states, curve so far, MLflow run id) goes to
``checkpoints/<variant>/last.pt``, outside the stage's outs so DVC does not delete it. Running the
stage again with the same params continues from there, in the same MLflow run, and ends with the
same weights as an uninterrupted run. A checkpoint made under other params is ignored.

Many processes: the same command under ``torchrun --nproc_per_node N -m vlbench train ...`` (or
``accelerate launch``) trains with DDP; ``optim.batch_size`` stays the global batch, each rank
takes its slice, and only rank 0 logs and writes (see vlbench/distributed.py).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed, io
from ..config import ParamError, load_params, section, to_flat_dict, variant, variant_group, variant_params
from ..models.factory import build_model, save_trained
from ..runtime import fault_point, fingerprint, pick_device, seed_everything
from ..tracking import Tracker
from .inputs import open_inputs
from .split import read_manifest


def lr_at(step: int, optim) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    t = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
    return optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Batches:
    """Random images with one of their captions drawn at random, from a seeded generator; with
    ``caption_sampling="all"``, every caption of each sampled image instead (the image repeats)."""

    def __init__(self, n_images: int, captions: list[list[str]], batch_size: int, seed: int,
                 caption_sampling: str = "random"):
        self.n_images, self.captions, self.batch_size = n_images, captions, batch_size
        self.caption_sampling = caption_sampling
        self.rng = random.Random(seed)

    def sample(self):
        idx = sorted(self.rng.sample(range(self.n_images), min(self.batch_size, self.n_images)))
        if self.caption_sampling == "all":
            pairs = [(i, j) for i in idx for j in range(len(self.captions[i]))]
            return [i for i, _ in pairs], [j for _, j in pairs]
        cap_idx = [self.rng.randrange(len(self.captions[i])) for i in idx]
        return idx, cap_idx


def _captions_by_row(splits_dir: str, split: str, ids: list[str]) -> list[list[str]]:
    df = read_manifest(splits_dir, split)
    by_id = dict(zip(df["image_id"], df["captions"]))
    return [list(by_id[i]) for i in ids]


class TextCache:
    """Frozen text encoder: every caption is encoded once instead of every step. Holds the pooled
    features, plus the token states (fp16) when a re-ranker needs to read every token."""

    @torch.no_grad()
    def __init__(self, model, captions: list[list[str]], device, batch_size: int = 256):
        flat = [c for caps in captions for c in caps]
        keep_tokens = model.reranker is not None
        pad_to = model.cfg.max_text_len if keep_tokens else None
        pooled, tokens, masks = [], [], []
        quiet = distributed.from_env().rank != 0  # one bar per job, not one per rank
        for s in tqdm(range(0, len(flat), batch_size), desc="text features", unit="batch", disable=quiet):
            t, m = model.text_tokens(flat[s : s + batch_size], device, pad_to=pad_to)
            pooled.append(model.pool_text(t, m).cpu())
            if keep_tokens:
                tokens.append(t.half().cpu())
                masks.append(m.cpu())
        self.pooled = torch.cat(pooled)
        self.tokens = torch.cat(tokens) if keep_tokens else None
        self.masks = torch.cat(masks) if keep_tokens else None
        self.first = np.cumsum([0] + [len(c) for c in captions])[:-1]  # row of each image's first caption

    def lookup(self, idx, cap_idx, device):
        """-> (pooled, tokens or None, mask or None) for caption cap_idx[k] of image idx[k]."""
        rows = torch.as_tensor(self.first[idx] + np.asarray(cap_idx))
        if self.tokens is None:
            return self.pooled[rows].to(device), None, None
        return self.pooled[rows].to(device), self.tokens[rows].to(device), self.masks[rows].to(device)


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


def make_val_loss(model, cfg, inputs, splits_dir: str, cached_text: bool, device, max_images: int = 256):
    """-> a function giving the mean loss over a fixed slice of the val split (first caption of
    each image, fixed batches): comparable across steps, and it draws no random numbers."""
    ids = inputs.ids[:max_images]
    captions = [caps[:1] for caps in _captions_by_row(splits_dir, "val", ids)]
    text_cache = TextCache(model, captions, device) if cached_text else None
    step_fn = make_step(model, cfg, captions, text_cache, inputs, device)
    bs = cfg.optim.batch_size

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        chunks = [list(range(s, min(s + bs, len(ids)))) for s in range(0, len(ids), bs)]
        chunks = [c for c in chunks if len(c) > 1]  # a contrastive batch of one is meaningless
        losses = [step_fn(c, [0] * len(c)).item() * len(c) for c in chunks]
        return sum(losses) / sum(map(len, chunks))

    return val_loss


def make_step(model, cfg, captions, text_cache, inputs, device, forward=None):
    """Return a function batch -> loss for this model family (``inputs``: see stages/inputs.py).
    ``forward``: what computes the loss in training (the model, or its DDP / compiled wrapper, whose
    forward is the loss over the global batch); by default the model's own per-process loss."""
    forward = model.loss if forward is None else forward
    if cfg.family == "alignment":
        def step(idx, cap_idx):
            images = inputs.batch(idx).to(device)
            if text_cache is not None:
                pooled, tokens, mask = text_cache.lookup(idx, cap_idx, device)
            else:
                tokens, mask = model.text_tokens([captions[i][j] for i, j in zip(idx, cap_idx)], device)
                pooled = model.pool_text(tokens, mask)
            return forward(images, pooled, tokens, mask)

        return step

    def step(idx, cap_idx):
        grid = inputs.batch(idx).to(device)
        return forward(grid, [captions[i][j] for i, j in zip(idx, cap_idx)])

    return step


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; None = plain fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def accumulate(step_fn, idx, cap_idx, micro_steps: int, amp, scaler, no_sync) -> torch.Tensor:
    """Forward and backward over ``micro_steps`` contiguous parts of the batch, each part's loss
    weighted by its share of the batch: the gradients of the whole batch's loss (exactly, when that
    loss is a mean over equally weighted items), in the memory of one part. Ranks synchronise
    gradients only on the last part (``no_sync``). -> the batch's loss, detached."""
    parts = list(zip(distributed.split(idx, micro_steps), distributed.split(cap_idx, micro_steps)))
    total = 0.0
    for k, (part_idx, part_cap_idx) in enumerate(parts):
        with no_sync() if k < len(parts) - 1 else contextlib.nullcontext():
            with amp:
                loss = step_fn(part_idx, part_cap_idx) * (len(part_idx) / len(idx))
            scaler.scale(loss).backward()
        total = total + loss.detach()
    return total


class Quiet:
    """Stands in for the MLflow Tracker on ranks other than 0, which log nothing."""

    run_id = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_params(self, *args, **kwargs) -> None:
        pass

    log_metrics = log_artifact = log_params


def run(params_path: str, name: str, features_dir: str | None, splits_dir: str, out: str, curves: str,
        checkpoint_dir: str | None = None) -> None:
    raw = load_params(params_path)
    cfg = variant(raw, name)
    pixels = variant_group(raw, name) == "pixel_variants"
    if pixels == bool(features_dir):
        raise ParamError(f"{variant_group(raw, name)}.{name}: " + (
            "a pixel variant reads images, not --features" if pixels else "needs --features (its cached image tokens)"))
    tcfg, tracking = section(raw, "train"), section(raw, "tracking")
    # optim.batch_size is the global batch of one optimizer step, whatever the number of processes
    # and micro-steps it is split into: results do not depend on the hardware
    ranks = distributed.from_env()
    parts = ranks.world_size * tcfg.grad_accum_steps
    if cfg.optim.batch_size % parts:
        raise ParamError(f"{variant_group(raw, name)}.{name}.optim.batch_size: {cfg.optim.batch_size} does not split "
                         f"into {ranks.world_size} process(es) x train.grad_accum_steps={tcfg.grad_accum_steps}")
    seed_everything(tcfg.seed)  # the same on every rank: same initial weights, same batches
    device = distributed.setup(ranks, pick_device(tcfg.device))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    inputs = open_inputs("train", splits_dir, features_dir, cfg)
    ids = inputs.ids
    captions = _captions_by_row(splits_dir, "train", ids)
    extra = {**inputs.describe(), "image_encoder": cfg.image_encoder}
    if cfg.model == "grid_transformer" and cfg.tokenizer == "words":
        from ..models.captioning import Vocabulary

        extra["vocab"] = Vocabulary.build([c for caps in captions for c in caps], cfg.min_word_count).itos
    model = build_model(cfg, extra["image_dim"], extra["n_grid"], extra.get("vocab"), pixels=pixels).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    text_cache = None
    if cfg.family == "alignment" and cfg.text_tuning == "frozen":
        model.eval()
        text_cache = TextCache(model, captions, device)
    optim = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                              fused=device.type == "cuda")  # one kernel for all parameters
    dtype = amp_dtype(tcfg.precision, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 underflows small gradients
    forward, no_sync = model, contextlib.nullcontext
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        # a fully tuned pretrained encoder has trainable parts the loss never reaches (HF poolers)
        unused = "full" in (getattr(cfg, "text_tuning", None), getattr(cfg, "image_tuning", None))
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=unused)
        no_sync = forward.no_sync
    if tcfg.compile:
        forward = torch.compile(forward)
    step_fn = make_step(model, cfg, captions, text_cache, inputs, device, forward)
    val_loss = make_val_loss(model, cfg, open_inputs("val", splits_dir, features_dir, cfg), splits_dir,
                             text_cache is not None, device) if ranks.is_main else None  # rank 0 validates
    # alignment always draws one caption per image: a repeated image would be a false negative
    batches = Batches(len(inputs), captions, cfg.optim.batch_size, tcfg.seed, getattr(cfg, "caption_sampling", "random"))

    ckpt = Checkpoint(Path(checkpoint_dir or f"checkpoints/{name}"),
                      fingerprint(variant_params(raw, name), tcfg.seed, tcfg.precision, tcfg.grad_accum_steps, extra, ids))
    state = ckpt.load()
    start, rows, best_val = 0, [], float("inf")
    run_id_file = out_dir / "run_id"
    if state is not None:  # every rank loads it: they all continue from the same state
        model.load_state_dict(state["model"], strict=False)
        optim.load_state_dict(state["optim"])
        scaler.load_state_dict(state["scaler"])
        batches.rng.setstate(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, rows, best_val = state["step"], state["rows"], state["best_val_loss"]
        if ranks.is_main:
            io.write_text(run_id_file, state["run_id"])
            print(f"vlbench train: resuming {name} from step {start}/{cfg.optim.steps}", file=sys.stderr)

    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    tracker = Tracker(tracking.experiment, name, run_id_file, resume=state is not None) if ranks.is_main else Quiet()
    with tracker as mlflow:
        if state is None:
            mlflow.log_params({**to_flat_dict(cfg), "seed": tcfg.seed, "device": str(device),
                               "trainable_params": n_trainable, "train_images": len(ids),
                               "precision": tcfg.precision, "compile": tcfg.compile,
                               "grad_accum_steps": tcfg.grad_accum_steps, "world_size": ranks.world_size})

        def save_checkpoint(next_step: int) -> None:
            ckpt.save(model={k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable},
                      optim=optim.state_dict(), scaler=scaler.state_dict(), step=next_step, rows=rows,
                      batch_rng=batches.rng.getstate(),
                      torch_rng=torch.get_rng_state(), run_id=mlflow.run_id, best_val_loss=best_val)

        def validate(at_step: int) -> None:
            nonlocal best_val
            with amp:
                loss = val_loss()
            best_val = min(best_val, loss)
            mlflow.log_metrics({"val_loss": loss, "best_val_loss": best_val}, step=at_step)
            model.train()  # models keep their frozen parts in eval mode themselves

        trainable = {k for k, v in model.named_parameters() if v.requires_grad} | {k for k, _ in model.named_buffers()}
        t0 = time.perf_counter()
        model.train()
        bar = tqdm(range(start, cfg.optim.steps), desc=f"train {name}", unit="step", initial=start, total=cfg.optim.steps,
                   disable=not ranks.is_main)
        for step in bar:
            lr = lr_at(step, cfg.optim)
            for g in optim.param_groups:
                g["lr"] = lr
            # every rank draws the whole global batch from the same seeded sampler and keeps its part
            idx, cap_idx = (ranks.share(x) for x in batches.sample())
            optim.zero_grad(set_to_none=True)
            loss = accumulate(step_fn, idx, cap_idx, tcfg.grad_accum_steps, amp, scaler, no_sync)
            scaler.unscale_(optim)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optim)
            scaler.update()
            if step % cfg.optim.log_every == 0 or step == cfg.optim.steps - 1:
                value = distributed.mean(loss.item(), device)  # the loss of the global batch
                rows.append({"step": step, "loss": round(value, 5), "lr": lr})
                mlflow.log_metrics({"train_loss": value, "lr": lr}, step=step)
                bar.set_postfix(loss=f"{value:.3f}")
            done = step + 1
            fault_point(done)
            at_checkpoint = tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0
            if ranks.is_main and (at_checkpoint or done == cfg.optim.steps):
                validate(done)
            stopping = distributed.any_rank(bool(stop["signal"]), device)  # all ranks stop at the same step
            if ranks.is_main and ((at_checkpoint and done < cfg.optim.steps) or stopping):
                save_checkpoint(done)
            if stopping:
                distributed.barrier()  # the launcher stops every rank once one exits: not before the save
                signum = stop["signal"] or signal.SIGTERM
                if ranks.is_main:
                    print(f"vlbench train: stopped by signal {signum} after step {done}; "
                          f"run the stage again to resume", file=sys.stderr)
                raise SystemExit(128 + signum)
        seconds = time.perf_counter() - t0
        if not ranks.is_main:
            return
        mlflow.log_metrics({"train_seconds": seconds, "train_samples_per_s": (cfg.optim.steps - start) * cfg.optim.batch_size / seconds})
        save_trained(model, out_dir, name, variant_params(raw, name), extra)
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
    ap.add_argument("--params", default="params.yaml",
                    help="params file (reads variants.<name> or pixel_variants.<name>, train, tracking)")
    ap.add_argument("--variant", required=True, help="a key of `variants` or `pixel_variants` in params.yaml")
    ap.add_argument("--features", default=None,
                    help="folder of the features stage for the variant's image encoder (not for pixel_variants, "
                         "which read the images listed in --splits)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--out", default=None, help="model folder (default models/<variant>)")
    ap.add_argument("--curves", default=None, help="training-curve CSV (default metrics/curves/<variant>.csv)")
    ap.add_argument("--checkpoints", default=None, help="resume folder (default checkpoints/<variant>)")
    a = ap.parse_args(argv)
    try:
        run(a.params, a.variant, a.features, a.splits, a.out or f"models/{a.variant}",
            a.curves or f"metrics/curves/{a.variant}.csv", a.checkpoints)
    finally:
        distributed.teardown()
