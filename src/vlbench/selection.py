"""Model selection on the dev split (``val`` in data/splits) during training.

Every ``train.eval_every`` steps and at the last step the train stage scores the model on the dev
split with its task's own metric (``train.select_on: auto``):

- alignment: rsum, the sum of R@1/5/10 both ways with the captions grouped per image
  (metrics/retrieval.py), over the first ``train.dev_images`` val images and all their captions;
  a re-ranker variant is scored on its dual encoder's ranking (re-ranking every evaluation would
  cost more than the training steps in between);
- captioning: CIDEr-D (metrics/cider_d.py: the maths of pycocoevalcap's ``Cider``, document
  frequencies from these dev references, as the test metric computes them) of greedy captions of
  the first ``train.dev_images`` val images against all their references, tokenised in Python
  instead of by the PTB tokenizer, which would start a JVM at every evaluation.

or with the dev loss (``select_on: loss``). ``Selection`` keeps the best evaluation's trainable
weights, which become the saved model, counts evaluations without improvement for early stopping
(``train.patience``), and is part of the resumable checkpoint (``state_dict``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .data.manifests import captions_by_row

DEV_METRICS = {"alignment": "rsum", "captioning": "cider"}


def selection_metric(family: str, select_on: str) -> str:
    """The metric that picks the model: ``val_loss``, ``rsum`` or ``cider``."""
    return "val_loss" if select_on == "loss" else DEV_METRICS[family]


def eval_cadence(tcfg) -> int:
    """Steps between dev evaluations: ``train.eval_every``, by default ``train.checkpoint_every``
    (0 = only at the last step)."""
    return tcfg.checkpoint_every if tcfg.eval_every is None else tcfg.eval_every


def _no_rng(device):
    """Evaluation must not move the RNG streams that training draws from (resume is bit-identical
    whether or not a run evaluated)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def make_dev_metric(model, cfg, inputs, splits_dir: str, device, max_images: int, batch_size: int = 64,
                    decoding=None) -> Callable[[], float]:
    """-> a function scoring ``model`` on the first ``max_images`` (0 = all) rows of ``inputs`` (the
    val split): rsum for an alignment model, CIDEr for a captioner, of greedy captions unless
    ``decoding`` (a DecodingConfig) is given. It puts the model in eval mode (the caller switches
    back) and draws no random numbers."""
    n = len(inputs) if max_images == 0 else min(max_images, len(inputs))
    ids = inputs.ids[:n]
    captions = captions_by_row(splits_dir, "val", ids)
    chunks = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if cfg.family == "alignment":
        return _dev_rsum(model, cfg, inputs, captions, chunks, device, batch_size)
    from .metrics.cider_d import cider_d

    refs = dict(enumerate(captions))
    decoding = decoding or dataclasses.replace(cfg.decoding, strategy="greedy")

    @torch.no_grad()
    def dev_cider() -> float:
        model.eval()
        hyps = []
        with _no_rng(device):
            for rows in chunks:
                hyps.extend(model.generate(inputs.batch(rows).to(device), decoding))
        return cider_d(refs, dict(enumerate(hyps)))

    return dev_cider


def _dev_rsum(model, cfg, inputs, captions, chunks, device, batch_size):
    from .metrics.retrieval import retrieval_metrics
    from .training import encode_texts

    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])

    def pooled_text() -> torch.Tensor:  # each distinct caption once, in batches of similar length
        return encode_texts(model, flat, device, batch_size, desc="dev captions")[0]

    frozen = None
    if cfg.text_tuning == "frozen":  # the text encoder does not change: encode the dev captions once
        with torch.no_grad():
            model.eval()
            frozen = pooled_text()

    @torch.no_grad()
    def dev_rsum() -> float:
        model.eval()
        with _no_rng(device):
            img = torch.cat([model.embed_images(model.image_tokens(inputs.batch(rows).to(device))) for rows in chunks])
            txt = model.embed_text_features(frozen if frozen is not None else pooled_text())
            return retrieval_metrics((img @ txt.t()).float(), owner.to(device))["rsum"]

    return dev_rsum


class Selection:
    """The best evaluation so far: its step, value and trainable weights, and the evaluations
    since it (for early stopping). ``rows`` is the dev curve (step, metric, value)."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.best: float | None = None
        self.best_step = -1
        self.bad = 0  # evaluations since the best one
        self.weights: dict[str, torch.Tensor] | None = None
        self.rows: list[dict] = []
        self.stopped_at: int | None = None  # the step training stopped early after, if it did

    def restart(self, metric: str) -> None:
        """A new phase scored by another metric: the best so far is forgotten (it was measured
        differently) and its patience starts again; the rows stay."""
        self.metric = metric
        self.best, self.best_step, self.bad, self.weights = None, -1, 0, None

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "val_loss"  # every other dev metric (CIDEr, recall sum) is a score

    def update(self, step: int, value: float, snapshot: Callable[[], dict]) -> bool:
        """Record the evaluation at ``step``; keep ``snapshot()`` when it is strictly better than
        every earlier one (a tie keeps the earlier step). -> whether it improved."""
        self.rows.append({"step": step, "metric": self.metric, "value": round(value, 5)})
        better = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        if better:
            self.best, self.best_step, self.bad, self.weights = value, step, 0, snapshot()
        else:
            self.bad += 1
        return better

    @property
    def exhausted(self) -> bool:
        """``patience`` evaluations in a row without improvement (never, with patience 0)."""
        return bool(self.patience) and self.bad >= self.patience

    def summary(self, steps_trained: int, steps: int) -> dict:
        """What config.json records about the selected model."""
        value = None if self.best is None else round(self.best, 5)
        return {"metric": self.metric, "step": self.best_step, "value": value, "evaluations": len(self.rows),
                "steps_trained": steps_trained, "steps": steps, "stopped_early": steps_trained < steps}

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "bad": self.bad, "weights": self.weights,
                "rows": self.rows, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.metric = state["metric"]
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
        self.weights, self.rows, self.stopped_at = state["weights"], state["rows"], state["stopped_at"]
