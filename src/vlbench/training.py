"""The pieces of a training loop that the train stage and the benchmarks share: the learning-rate
schedule, seeded batches, the frozen text encoder's cache, one step's loss, autocast, gradient
accumulation, the weight average and the resumable checkpoint."""
from __future__ import annotations

import contextlib
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, io
from .models.protocols import AlignmentModel, CaptioningModel


def lr_at(step: int, optim) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    t = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
    return optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Batches:
    """Random images with one of their captions drawn at random, from a seeded generator; with
    ``caption_sampling="all"``, every caption of each sampled image instead (the image repeats);
    with ``captions_per_image=k`` > 1, k distinct random captions of each (all, when it has fewer)."""

    def __init__(self, n_images: int, captions: list[list[str]], batch_size: int, seed: int,
                 caption_sampling: str = "random", captions_per_image: int = 1):
        self.n_images, self.captions, self.batch_size = n_images, captions, batch_size
        self.caption_sampling, self.captions_per_image = caption_sampling, captions_per_image
        self.rng = random.Random(seed)

    def sample(self):
        idx = sorted(self.rng.sample(range(self.n_images), min(self.batch_size, self.n_images)))
        if self.caption_sampling == "all":
            pairs = [(i, j) for i in idx for j in range(len(self.captions[i]))]
            return [i for i, _ in pairs], [j for _, j in pairs]
        if self.captions_per_image > 1:
            pairs = [(i, j) for i in idx
                     for j in self.rng.sample(range(len(self.captions[i])), min(self.captions_per_image, len(self.captions[i])))]
            return [i for i, _ in pairs], [j for _, j in pairs]
        cap_idx = [self.rng.randrange(len(self.captions[i])) for i in idx]
        return idx, cap_idx


@torch.no_grad()
def encode_texts(model: AlignmentModel, texts: list[str], device, batch_size: int = 64, keep_tokens: bool = False,
                 desc: str = "text features"):
    """The frozen text encoder's pooled features [N, D] of ``texts`` (and, with ``keep_tokens``, the
    token states [N, max_text_len, D] and masks, padded to a fixed length so they stack).

    Each distinct text is encoded once, in batches of similar length: padding is what a batch of
    mixed lengths mostly computes (2-3x the work on captions), and captions repeat (the shapes
    data: 4,734 distinct of 6,750). Rows come back in the order of ``texts``."""
    distinct = list(dict.fromkeys(texts))
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    pooled, tokens, masks = [None] * len(distinct), [None] * len(distinct), [None] * len(distinct)
    quiet = distributed.from_env().rank != 0  # one bar per job, not one per rank
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=quiet):
        rows = order[s : s + batch_size]
        t, m = model.text_tokens([distinct[i] for i in rows], device)  # padded to the batch's longest only
        p = model.pool_text(t, m)
        if keep_tokens:  # zeros past the batch's longest caption (masked out, as its padding is): 1.7x faster than encoding them
            extra = model.cfg.max_text_len - t.shape[1]
            t, m = F.pad(t, (0, 0, 0, extra)), F.pad(m, (0, extra))
        for k, i in enumerate(rows):
            pooled[i] = p[k]
            if keep_tokens:
                tokens[i], masks[i] = t[k], m[k]
    where = {text: i for i, text in enumerate(distinct)}
    rows = torch.as_tensor([where[t] for t in texts], dtype=torch.long)
    pooled = torch.stack(pooled)[rows]
    if not keep_tokens:
        return pooled, None, None
    return pooled, torch.stack(tokens)[rows], torch.stack(masks)[rows]


class TextCache:
    """Frozen text encoder: every caption is encoded once instead of every step. Holds the pooled
    features, plus the token states (fp16) when a re-ranker needs to read every token."""

    def __init__(self, model: AlignmentModel, captions: list[list[str]], device):
        pooled, tokens, masks = encode_texts(model, [c for caps in captions for c in caps], device,
                                             keep_tokens=model.reranker is not None)
        self.pooled = pooled.cpu()
        self.tokens = tokens.half().cpu() if tokens is not None else None
        self.masks = masks.cpu() if masks is not None else None
        self.first = np.cumsum([0] + [len(c) for c in captions])[:-1]  # row of each image's first caption

    def lookup(self, idx, cap_idx, device):
        """-> (pooled, tokens or None, mask or None) for caption cap_idx[k] of image idx[k]."""
        rows = torch.as_tensor(self.first[idx] + np.asarray(cap_idx))
        if self.tokens is None:
            return self.pooled[rows].to(device), None, None
        return self.pooled[rows].to(device), self.tokens[rows].to(device), self.masks[rows].to(device)


class TunedTextCache:
    """Text tuning of the top layers only (``text_tuning: full`` with ``text_tune_layers``): the
    frozen embeddings and bottom layers give every caption the same output every step (they run in
    eval mode, without dropout), so it is computed once here (fp16, [captions, max_text_len, D]) and
    each step runs only the tuned layers on it. ``lookup`` returns what the uncached step computes:
    pooled text features, token states and mask (trimmed to the batch's longest caption)."""

    def __init__(self, model: AlignmentModel, captions: list[list[str]], device, batch_size: int = 64):
        texts = [c for caps in captions for c in caps]
        self.model = model
        states, masks = [], []
        was_training = model.training
        model.eval()
        for s in tqdm(range(0, len(texts), batch_size), desc="frozen text layers", unit="batch",
                      disable=distributed.from_env().rank != 0):
            h, m = model.text_frozen_states(texts[s : s + batch_size], device, model.cfg.max_text_len)
            states.append(h.half().cpu())
            masks.append(m.cpu())
        model.train(was_training)
        self.states, self.masks = torch.cat(states), torch.cat(masks)
        self.first = np.cumsum([0] + [len(c) for c in captions])[:-1]  # row of each image's first caption

    @staticmethod
    @torch.no_grad()
    def works_for(model: AlignmentModel, texts: list[str], device) -> bool:
        """Whether running the tuned layers apart gives the encoder's own output on ``texts`` (it
        does for BERT-style encoders; an architecture whose layers need more than the hidden states
        and the attention mask would not)."""
        if getattr(model, "text_top", None) is None:
            return False
        was_training = model.training
        model.eval()
        try:
            whole, mask = model.text_tokens(texts, device, pad_to=model.cfg.max_text_len)
            states, _ = model.text_frozen_states(texts, device, model.cfg.max_text_len)
            apart = model.text_tokens_from_frozen(states, mask)
            keep = mask.bool()
            return bool(torch.allclose(apart[keep], whole[keep], atol=1e-4, rtol=1e-4))
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            return False
        finally:
            model.train(was_training)

    def lookup(self, idx, cap_idx, device):
        rows = torch.as_tensor(self.first[idx] + np.asarray(cap_idx))
        mask = self.masks[rows]
        n = int(mask.sum(1).max())  # padding past the longest caption changes nothing but the cost
        mask = mask[:, :n].to(device)
        tokens = self.model.text_tokens_from_frozen(self.states[rows, :n].to(device).float(), mask)
        return self.model.pool_text(tokens, mask), tokens, mask


def make_step(model: AlignmentModel | CaptioningModel, cfg, captions: list[list[str]], text_cache: TextCache | None,
              inputs, device, forward=None):
    """Return a function batch -> loss for this model family (``inputs``: see vlbench/inputs.py).
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
            # which image each pair shows: with several captions per image, the loss must know
            return forward(images, pooled, tokens, mask, image_ids=torch.as_tensor(idx, device=device))

        return step

    def step(idx, cap_idx):
        texts = [captions[i][j] for i, j in zip(idx, cap_idx)]
        distinct = sorted(set(idx))
        if len(distinct) == len(idx):
            return forward(inputs.batch(idx).to(device), texts)
        # several captions of an image (caption_sampling: all): its grid is loaded and encoded once
        row_of = {i: r for r, i in enumerate(distinct)}
        rows = torch.as_tensor([row_of[i] for i in idx], device=device)
        return forward(inputs.batch(distinct).to(device), texts, rows=rows)

    return step


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware: a CUDA GPU that supports bf16, or
    a CPU with AVX512-BF16 or AMX (oneDNN's check). Elsewhere bf16 autocast is emulated: on a 2-core
    AVX2-only EPYC a grid transformer step took 22 s under bf16 against 1.0 s in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def no_bf16_reason(device: torch.device) -> str:
    """Why ``device`` lacks native bf16 (``native_bf16`` is False), for warnings."""
    if device.type == "cuda":
        return "this GPU has no bf16"
    return f"this {device.type} has no bf16 in hardware (no AVX512-BF16/AMX)"


def variant_precision(cfg, tcfg) -> str:
    """A variant's autocast precision: its own ``optim.precision``, else the run's ``train.precision``."""
    return cfg.optim.precision or tcfg.precision


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``train.precision`` or a variant's ``optim.precision``)
    on ``device``; None = plain fp32. ``auto``: bf16 where the device has it in hardware, else fp32."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
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


class WeightAverage:
    """An exponential moving average of trainable weights (``optim.ema_decay``): after optimizer
    step t (from 0), ``avg <- d * avg + (1 - d) * w`` with d = min(decay, (1 + t) / (10 + t)), so
    the first steps' weights (far from the end of training) weigh little even in a short run.
    ``applied()`` swaps the average into the live parameters (for a dev evaluation and the saved model) and the
    trained weights back afterwards: training itself always continues from its own weights."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        self.names, self.decay = list(named), decay
        self.weights = [named[k] for k in self.names]  # the live parameters
        self.average = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, self.weights, 1.0 - d)

    @contextlib.contextmanager
    def applied(self):
        trained = [w.detach().clone() for w in self.weights]
        self.copy_to_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.weights, trained)

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        """Make the average the live parameters for good (training goes on from it)."""
        torch._foreach_copy_(self.weights, self.average)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: a.detach().cpu() for k, a in zip(self.names, self.average)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, a in zip(self.names, self.average):
                a.copy_(state[k])


class Checkpoint:
    """The state needed to continue training exactly, loaded without pickle (weights_only)."""

    def __init__(self, folder: Path, fingerprint: str, filename: str = "last.pt"):
        self.path, self.fingerprint = folder / filename, fingerprint

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
