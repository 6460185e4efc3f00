"""The schema pieces every params section builds on: ``build`` (a dict -> a validated dataclass,
each error naming its dotted key), the range checks, and the configs several variant models share
(optimizer, LoRA, decoding, the keys every variant has). Sections live in params.py, each variant
model's own config next to the model.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ParamError


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ParamError(f"{key}: {value!r} is not one of: {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _check_value(key, value, arms[0])
        for arm in arms:  # e.g. int | Literal["native"]: the first arm that accepts the value
            try:
                return _check_value(key, value, arm)
            except ParamError:
                pass
        raise ParamError(f"{key}: expected {' or '.join(_describe(a) for a in arms)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-3 as a string; accept it the way a user means it.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def build(cls, raw: Any, prefix: str):
    """Build dataclass ``cls`` from ``raw`` dict, naming ``prefix.key`` in every error."""
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamError(f"{key}: missing required key")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name], key)
        else:
            kwargs[name] = _check_value(key, raw[name], tp)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check:
        check(prefix)
    return obj


def positive(prefix: str, obj, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ParamError(f"{prefix}.{n}: must be > 0, got {getattr(obj, n)!r}")


def in_range(prefix: str, obj, name: str, lo: float, hi: float) -> None:
    v = getattr(obj, name)
    if not lo <= v <= hi:
        raise ParamError(f"{prefix}.{name}: must be in [{lo}, {hi}], got {v!r}")


# ---------------------------------------------------------------- shared by variant models


@dataclass
class OptimConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    log_every: int = 10
    # > 0: dev evaluations, model selection and the saved model use an exponential moving average
    # of the trainable weights (vlbench/training.WeightAverage); 0: the weights of the step itself
    ema_decay: float = 0.0
    # this variant's autocast dtype, when it differs from train.precision (null = train.precision):
    # e.g. bf16 for the frozen-LM captioners, where it pays most, or auto for a variant that must also
    # train on CPUs without native bf16
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None

    def check(self, p):
        positive(p, self, "steps", "batch_size", "lr", "log_every")
        if not 0 <= self.ema_decay < 1:
            raise ParamError(f"{p}.ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.weight_decay < 0:
            raise ParamError(f"{p}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ParamError(f"{p}.warmup_steps: must be >= 0, got {self.warmup_steps}")


@dataclass
class LoraConfig:
    """peft LoRA on the text encoder (used when text_tuning is lora)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])

    def check(self, p):
        positive(p, self, "r", "alpha")
        in_range(p, self, "dropout", 0.0, 0.9)
        if not self.target_modules:
            raise ParamError(f"{p}.target_modules: name at least one module (e.g. query, value)")


@dataclass
class DecodingConfig:
    strategy: Literal["greedy", "beam", "nucleus"] = "greedy"
    beam_size: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    max_len: int = 24
    # never emit a token trigram twice in one caption: the grid transformer's own search (word
    # trigrams with the words tokenizer); LM captioners through generate's no_repeat_ngram_size=3
    block_trigrams: bool = False
    # beam search ranks captions by summed log-probability / tokens ** length_penalty: 0 = the plain
    # sum, which favours short captions; 1 = the mean per token. The grid transformer's own search
    # only: the LM captioners' generate applies Hugging Face's own (length_penalty 1.0)
    length_penalty: float = 0.0
    # consensus re-ranking (models/consensus.py): beam search's final beams re-ranked by z(ranking score)
    # + rerank_weight x z(CIDEr-D against the captions of the rerank_neighbours training images nearest
    # in mean-pooled image features); 0 = off. The grid transformer's beam search only; its model
    # folder then keeps those training images' pooled features and captions
    rerank_neighbours: int = 0
    rerank_weight: float = 1.0

    def check(self, p):
        positive(p, self, "beam_size", "temperature", "max_len")
        in_range(p, self, "top_p", 1e-6, 1.0)
        in_range(p, self, "length_penalty", 0.0, 5.0)
        in_range(p, self, "rerank_weight", 0.0, 100.0)
        if self.rerank_neighbours < 0:
            raise ParamError(f"{p}.rerank_neighbours: must be >= 0 (0 = off), got {self.rerank_neighbours}")
        if self.rerank_neighbours and self.strategy != "beam":
            raise ParamError(f"{p}.rerank_neighbours: re-ranks the beams of a beam search; set {p}.strategy: beam "
                             f"(it is {self.strategy!r}) or leave rerank_neighbours at 0")


@dataclass
class ScstConfig:
    """Self-critical sequence training after the cross-entropy steps (vlbench/scst.py): CIDEr-D of
    candidate captions (document frequencies of the training references) as the reward, the mean
    reward of the image's other samples as the baseline. steps 0 = off."""

    steps: int = 0
    samples: int = 5  # candidate captions per image (sampled, or beams); the baseline of each is the mean of the others
    lr: float = 1e-5  # constant, AdamW; gradients clipped at norm 1 as in cross-entropy training
    batch_size: int = 16  # images per step (x samples captions)
    max_len: int = 24  # tokens per sampled caption at most (the grid transformer: BOS and EOS included)
    # lr rises linearly over the first warmup_steps: a fresh AdamW's first updates move every weight
    # by about lr whatever the (noisy) policy gradient's size
    warmup_steps: int = 0
    # each image's ``samples`` candidates: drawn from the model's full distribution ("sample"), or the
    # beams of a beam search that wide ("beam", the M2 transformer's SCST; the grid transformer only):
    # beam candidates train the captions beam decoding produces (benchmarks/RESULTS.md, Flickr8k dev)
    candidates: Literal["sample", "beam"] = "sample"
    # the weights SCST starts from: the selected cross-entropy model ("best": the best dev evaluation,
    # which on a few hundred dev images is a noisy pick among late steps), or the last cross-entropy
    # evaluation's ("last": the weight average at the last step, when optim.ema_decay is set)
    start: Literal["best", "last"] = "best"
    # reward = CIDEr-D + bleu_weight x sentence BLEU-4 (metrics/sentence_bleu.py), both against the
    # training references: 0 = CIDEr-D alone, the usual SCST reward
    bleu_weight: float = 0.0
    # SCST's dev evaluations. "greedy": the cross-entropy phase's metric (greedy CIDEr-D on
    # train.dev_images images), one selection over both phases. "configured": CIDEr-D of the captions the
    # variant's own ``decoding`` gives (what evaluate scores: beams, length penalty, blocking) on
    # dev_images images; the SCST start is scored the same way and the model is the best of the SCST
    # start and SCST's evaluations (greedy CIDEr on a few hundred images can prefer a step whose beam
    # captions are worse)
    dev_decoding: Literal["greedy", "configured"] = "greedy"
    dev_images: int | None = None  # dev images of those evaluations: None = train.dev_images, 0 = all
    eval_every: int | None = None  # SCST steps between them: None = train.eval_every (0 = only the last step)
    # > 0: SCST's evaluations score (and the saved model holds) an exponential moving average of its
    # weights (training.WeightAverage, as optim.ema_decay in cross-entropy training); the policy gradient
    # of a few images a step moves dev CIDEr up and down by about 1 between evaluations. 0 = off
    ema_decay: float = 0.0
    # evaluations in a row without a better dev metric before SCST stops: None = train.patience, 0 =
    # never (every SCST step is trained and the best evaluation kept). SCST's dev curve dips and
    # recovers over more evaluations than cross-entropy's does
    patience: int | None = None

    def check(self, p):
        if self.steps < 0:
            raise ParamError(f"{p}.steps: must be >= 0 (0 = off), got {self.steps}")
        if self.samples < 2:
            raise ParamError(f"{p}.samples: must be >= 2 (each sample's baseline is the mean of the others), "
                             f"got {self.samples}")
        positive(p, self, "lr", "batch_size", "max_len")
        if self.warmup_steps < 0:
            raise ParamError(f"{p}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.bleu_weight < 0:
            raise ParamError(f"{p}.bleu_weight: must be >= 0 (0 = CIDEr-D alone), got {self.bleu_weight}")
        if not 0 <= self.ema_decay < 1:
            raise ParamError(f"{p}.ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        for key in ("dev_images", "eval_every", "patience"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ParamError(f"{p}.{key}: must be >= 0 or unset, got {getattr(self, key)}")


def check_lm_captioner_search(p: str, decoding: DecodingConfig, scst: ScstConfig) -> None:
    """What only the grid transformer's own beam search offers: the LM captioners decode through
    Hugging Face generate (its own length normalisation) and train SCST on sampled candidates."""
    if decoding.length_penalty != 0:
        raise ParamError(f"{p}.decoding.length_penalty: implemented for the grid transformer only (this "
                         f"captioner's generate applies Hugging Face's own, 1.0); leave it at 0")
    if decoding.rerank_neighbours:
        raise ParamError(f"{p}.decoding.rerank_neighbours: implemented for the grid transformer's beam search only; "
                         f"leave it at 0")
    if scst.candidates != "sample":
        raise ParamError(f"{p}.scst.candidates: {scst.candidates!r} is implemented for the grid transformer only; "
                         f"use 'sample' for this captioner")


@dataclass
class VariantConfig:
    """The keys every variant has; each variant model's config adds its own after them.

    ``family`` follows from ``model`` (the registry, models/variants.py): params.yaml may leave it
    out, and when it gives it, it must match."""

    family: str
    model: str
    image_encoder: str


def to_flat_dict(obj, prefix: str = "") -> dict[str, Any]:
    """Dataclass -> {'optim.lr': 0.001, ...} for MLflow params."""
    out = {}
    for k, v in dataclasses.asdict(obj).items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{prefix}{k}.{k2}"] = v2
        else:
            out[f"{prefix}{k}"] = v
    return out
