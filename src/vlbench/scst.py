"""Self-critical sequence training (SCST) of a captioner after its cross-entropy steps
(``variants.<name>.scst``, steps 0 = off).

Each step draws ``scst.batch_size`` training images, takes ``scst.samples`` = k candidate captions
per image, sampled from the model's full distribution (``sample_with_logprobs``: summed
log-probabilities with gradients) or, with ``scst.candidates: beam``, the k beams of a width-k beam
search (``beams_with_logprobs``, the grid transformer; the M2 transformer's SCST), rewards each with
its CIDEr-D against the image's training references (metrics/cider_d.py; document frequencies of
the training references only, never dev or test), plus ``scst.bleu_weight`` x its sentence BLEU-4
against the same references (metrics/sentence_bleu.py; 0 = CIDEr-D alone), and minimises

    - mean over samples of (reward - baseline) x log p(caption)

with the "new SCST" baseline (Luo 2020): the baseline of sample i is the mean reward of the image's
other k-1 samples, so no greedy decoding is needed and a sample never competes with itself.

The model samples in eval mode (dropout off): the policy trained is the one the evaluation decodes
with. AdamW at the constant ``scst.lr`` (after a linear rise over ``scst.warmup_steps``), gradients
clipped at norm 1 as in cross-entropy training.
Model selection goes on through SCST (vlbench/selection.py): every ``train.eval_every`` SCST
steps and after the last, the train stage's dev evaluation scores the model with the same dev
metric and the same ``Selection`` as its cross-entropy steps (patience restarts at the first SCST
step; ``scst.patience`` replaces ``train.patience`` there when set, 0 = never stop), so the saved
model is the best dev evaluation of either phase; SCST that lowers dev CIDEr leaves the
cross-entropy model in place. With ``scst.ema_decay`` > 0 those evaluations score an
exponential moving average of the SCST weights (training.WeightAverage) and the saved model is that
average; the policy itself trains on, and samples from, its own weights. Logged to MLflow:
``scst_reward`` and ``scst_baseline`` (batch means of the reward x100, the scale of the test
metrics) every ``optim.log_every`` steps,
``scst_seconds``, and the dev metric of each evaluation (steps numbered on from the cross-entropy
steps, as are the reward rows in the training-curve CSV).

Resume: at ``train.checkpoint_every`` SCST steps and on SIGTERM the train stage's checkpoint is
saved with an ``scst`` entry (step, optimizer, batch RNG, sampling generator, reward rows); the
checkpoint's weights are then the SCST weights, and its step the last cross-entropy step, so a
resumed run skips the cross-entropy loop and continues SCST where it stopped. Under torchrun,
SCST runs on rank 0 alone (the other ranks finish after the cross-entropy steps).
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .metrics.cider_d import CiderD
from .metrics.sentence_bleu import bleu_against, reference_clips
from .runtime import fault_point
from .training import WeightAverage

def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, k] -> baselines [B, k]: for each sample the mean reward of the other k-1 samples
    of the same image."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def scst_lr(step: int, scfg) -> float:
    """The learning rate of SCST step ``step`` (from 0): linear warm-up, then constant."""
    if step < scfg.warmup_steps:
        return scfg.lr * (step + 1) / scfg.warmup_steps
    return scfg.lr


def scst_loss(logprobs: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs [B*k] (item-major, with gradients), rewards [B, k] -> (policy-gradient loss, baselines [B, k])."""
    baseline = mean_of_others(rewards)
    advantage = (rewards - baseline).reshape(-1).to(logprobs.device, logprobs.dtype)
    return -(advantage.detach() * logprobs).mean(), baseline


class ScstTrainer:
    """One SCST update per ``step(grid, references)``; ``references[i]`` are image i's training captions."""

    def __init__(self, model, cider: CiderD, samples: int, max_len: int, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator | None = None, amp=None, scaler=None, clip: float = 1.0,
                 candidates: str = "sample", bleu_weight: float = 0.0):
        self.model, self.cider, self.k, self.max_len = model, cider, samples, max_len
        self.candidates, self.bleu_weight = candidates, bleu_weight
        self.optimizer, self.generator, self.clip = optimizer, generator, clip
        self.amp = amp or contextlib.nullcontext()
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(enabled=False)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def rewards(self, texts: Sequence[str], references: Sequence[Sequence[str]]) -> torch.Tensor:
        """CIDEr-D (+ ``bleu_weight`` x sentence BLEU-4) of each of the B*k sampled captions (item-major) -> [B, k]."""
        per_row = [refs for refs in references for _ in range(self.k)]
        reward = self.cider.scores(texts, per_row)
        if self.bleu_weight:
            clips = [reference_clips(refs) for refs in references]  # each image's, shared by its k captions
            reward = reward + self.bleu_weight * np.array([bleu_against(t, clips[i // self.k]) for i, t in enumerate(texts)])
        return torch.from_numpy(reward).float().view(len(references), self.k)

    def step(self, grid: torch.Tensor, references: Sequence[Sequence[str]]) -> dict[str, float]:
        self.model.eval()  # dropout off: sample (and train) the policy that evaluation decodes with
        with self.amp:
            if self.candidates == "beam":
                s = self.model.beams_with_logprobs(grid, self.k, self.max_len)
            else:
                s = self.model.sample_with_logprobs(grid, self.k, self.max_len, self.generator)
        rewards = self.rewards(s.texts, references)
        loss, baseline = scst_loss(s.logprobs, rewards.to(s.logprobs.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"reward": rewards.mean().item(), "baseline": baseline.mean().item(), "loss": loss.item()}


def run_scst(model, cfg, inputs, captions: list[list[str]], device, mlflow, *, first_step: int, seed: int,
             state: dict | None, save: Callable[[dict], None], stop: dict, checkpoint_every: int,
             evaluate: Callable[[int], None], selection, eval_every: int, amp=None, scaler=None,
             name: str = "") -> list[dict]:
    """The SCST phase of the train stage, on one process. ``first_step``: the step number of the
    first SCST step in logs and the curve; ``state``: the loaded resumable checkpoint (or None);
    ``save(scst_state)``: writes the checkpoint with it; ``evaluate(step)``: the train stage's dev
    evaluation, which updates ``selection``; ``name``: the variant, for the progress bar.
    -> (the curve rows of the SCST steps, how many SCST steps were trained)."""
    scfg = cfg.scst
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=cfg.optim.weight_decay)
    cider = CiderD(captions)  # document frequencies: the training references only
    rng = random.Random(seed + 7919)  # images per step; its own stream: the cross-entropy batches are untouched
    generator = torch.Generator(device=device).manual_seed(seed + 104729)
    trainer = ScstTrainer(model, cider, scfg.samples, scfg.max_len, optimizer, generator, amp, scaler,
                          candidates=scfg.candidates, bleu_weight=scfg.bleu_weight)

    average = WeightAverage({k: p for k, p in model.named_parameters() if p.requires_grad},
                            scfg.ema_decay) if scfg.ema_decay else None

    if scfg.patience is not None:  # SCST's own early stopping (the selection is not saved with it: set on resume too)
        selection.patience = scfg.patience
    resumed = (state or {}).get("scst")
    if resumed is not None:
        model.load_state_dict(state["model"], strict=False)  # the SCST weights of that checkpoint
        if average is not None:
            average.load_state_dict(resumed["average"])
        optimizer.load_state_dict(resumed["optim"])
        rng.setstate(resumed["rng"])
        generator.set_state(resumed["generator"])
        begin, rows, first_step = resumed["step"], resumed["rows"], resumed["first_step"]
        print(f"vlbench train: resuming SCST from step {begin}/{scfg.steps}", file=sys.stderr)
    else:
        begin, rows = 0, []
        selection.bad = 0  # a new phase: its own patience

    def snapshot(done: int) -> dict:
        return {"step": done, "optim": optimizer.state_dict(), "rng": rng.getstate(),
                "generator": generator.get_state(), "rows": rows, "first_step": first_step,
                "average": average.state_dict() if average is not None else None}

    t0, done = time.perf_counter(), begin
    bar = tqdm(desc=f"SCST {name}".strip(), unit="step", initial=begin, total=scfg.steps)
    for s in range(begin, scfg.steps):
        idx = sorted(rng.sample(range(len(inputs)), min(scfg.batch_size, len(inputs))))
        lr = scst_lr(s, scfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = trainer.step(inputs.batch(idx).to(device), [captions[i] for i in idx])
        if average is not None:
            average.update(s)
        if s % cfg.optim.log_every == 0 or s == scfg.steps - 1:
            reward, baseline = 100.0 * out["reward"], 100.0 * out["baseline"]
            rows.append({"step": first_step + s, "lr": lr, "scst_reward": round(reward, 5),
                         "scst_baseline": round(baseline, 5)})
            mlflow.log_metrics({"scst_reward": reward, "scst_baseline": baseline, "scst_loss": out["loss"]},
                               step=first_step + s)
            bar.set_postfix(reward=f"{reward:.1f}")
        bar.update()
        done = s + 1
        fault_point(first_step + done)
        if (eval_every and done % eval_every == 0) or done == scfg.steps:
            with average.applied() if average is not None else contextlib.nullcontext():
                evaluate(first_step + done)
        early = selection.exhausted and done < scfg.steps
        if early:
            print(f"vlbench train: SCST stopped after step {done}: no better dev {selection.metric} in "
                  f"{selection.patience} evaluations (best {selection.best:.4g} at step {selection.best_step})",
                  file=sys.stderr)
        elif stop.get("signal") or (checkpoint_every and done % checkpoint_every == 0 and done < scfg.steps):
            save(snapshot(done))
        if stop.get("signal") and not early:
            print(f"vlbench train: stopped by signal {stop['signal']} after SCST step {done}; "
                  f"run the stage again to resume", file=sys.stderr)
            raise SystemExit(128 + stop["signal"])
        if early:
            break
    bar.close()
    mlflow.log_metrics({"scst_seconds": time.perf_counter() - t0}, step=first_step + scfg.steps)
    return rows, done
