"""params.yaml -> typed, validated sections and variants.

Every stage reads only its own section. Validation happens before any expensive work and fails
with one line naming the offending key (``ParamError``), which the CLI turns into exit code 2.
The run-wide sections are here, and where each variant's raw params are; each variant model's
params schema lives next to the model (models/variants.py lists them and builds a variant's config),
the pieces they share in config.py. ``validate_all`` (validation.py) checks the whole file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .config import build, in_range, positive
from .errors import ParamError

# ---------------------------------------------------------------- data / split / features


@dataclass
class ShapesConfig:
    n_images: int = 1800
    image_size: int = 128
    seed: int = 0

    def check(self, p):
        positive(p, self, "n_images", "image_size")


@dataclass
class DataConfig:
    name: Literal["shapes", "flickr8k", "flickr30k", "coco"]
    root: str | None = None  # a local copy; None = download it into the download cache
    urls: dict[str, str] = field(default_factory=dict)  # archive -> mirror URL (see data/sources.py)
    max_broken_fraction: float = 0.05  # more missing or undecodable images than this stops the run
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    def check(self, p):
        from .io import project_root  # a relative root is the project's, also in a queued DVC experiment

        if self.name != "shapes" and self.root and not (project_root() / self.root).is_dir():
            raise ParamError(f"{p}.root: folder {self.root!r} does not exist")
        in_range(p, self, "max_broken_fraction", 0.0, 1.0)
        from .data.sources import ARCHIVES

        if self.urls is None:  # `urls:` left empty in the YAML
            self.urls = {}
        if not isinstance(self.urls, dict):
            raise ParamError(f"{p}.urls: expected a mapping of archive name to URL, got {self.urls!r}")
        for key, url in self.urls.items():
            if key not in ARCHIVES:
                raise ParamError(f"{p}.urls.{key}: unknown archive (known: {', '.join(ARCHIVES)})")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ParamError(f"{p}.urls.{key}: expected an http(s) URL, got {url!r}")


@dataclass
class SplitConfig:
    seed: int = 0
    val_size: int = 150
    test_size: int = 300

    def check(self, p):
        positive(p, self, "val_size", "test_size")


@dataclass
class FeaturesConfig:
    backbones: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    # pixels per side, or native: each backbone at the resolution it was trained at
    # (efficientnet_lite0/1/2: 224/240/260; models/registry.py native_image_size)
    image_size: int | Literal["native"] = 128
    batch_size: int = 64

    def check(self, p):
        positive(p, self, "batch_size")
        if self.image_size != "native":
            positive(p, self, "image_size")
        from .models.registry import check_image_encoder  # imports torch: only when features are validated

        for i, b in enumerate(self.backbones):
            check_image_encoder(f"{p}.backbones[{i}]", b)


# ---------------------------------------------------------------- transfer (evaluation on other datasets)


@dataclass
class TransferDataset:
    """Another dataset's test split to score every trained variant on (stage `transfer`)."""

    name: Literal["flickr8k", "flickr30k", "coco"]  # which layouts to look for (data/layouts.py)
    root: str  # a local copy in any layout the download stage reads (relative: the project's)
    # Only for a copy without a split of its own (no Karpathy json, no Flickr8k split files): score a
    # seeded sample of this many of its images. null: such a copy is refused (it has no test split).
    test_size: int | None = None
    seed: int = 0

    def check(self, p):
        from .io import project_root

        if not (project_root() / self.root).is_dir():
            raise ParamError(f"{p}.root: folder {self.root!r} does not exist")
        if self.test_size is not None:
            positive(p, self, "test_size")


def check_label(p: str, label) -> None:
    """A transfer dataset's label names files and MLflow metrics: letters, digits, _ and -."""
    import re

    if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", label):
        raise ParamError(f"{p}.{label}: a label is letters, digits, _ and - (it names files and MLflow metrics)")


@dataclass
class TransferConfig:
    # label -> TransferDataset; the label names its files (data/transfer/<label>/,
    # metrics/transfer/<label>/) and its MLflow metrics (transfer_<label>_test_*)
    datasets: dict = field(default_factory=dict)

    def check(self, p):
        if self.datasets is None:  # `datasets:` left empty in the YAML
            self.datasets = {}
        if not isinstance(self.datasets, dict):
            raise ParamError(f"{p}.datasets: expected a mapping of labels to {{name, root}}, got {self.datasets!r}")
        for label, entry in list(self.datasets.items()):
            check_label(f"{p}.datasets", label)
            self.datasets[label] = build(TransferDataset, entry, f"{p}.datasets.{label}")



# ---------------------------------------------------------------- run-wide sections


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100  # steps between resumable checkpoints; 0 = never
    # autocast dtype; auto = bf16 where the device computes it in hardware (CUDA, CPUs with
    # AVX512-BF16/AMX), fp32 elsewhere, where bf16 is emulated and many times slower; fp16 scales the
    # loss (GradScaler, its state goes into the checkpoint). A variant's optim.precision overrides it
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the model
    # split each optimizer step's batch into this many forward/backward passes (same memory as a
    # smaller batch, same gradients for captioners; contrastive variants see fewer negatives per pass)
    grad_accum_steps: int = 1
    # CPU threads of each train/evaluate process; 0 = auto: the usable cores divided by the
    # VLBENCH_JOBS environment variable (jobs run side by side); OMP_NUM_THREADS, when set, wins
    threads: int = 0
    # model selection on the dev split (val): every eval_every steps and at the last step the model is
    # scored with select_on (auto: rsum for alignment, CIDEr of greedy captions for captioners; loss:
    # the dev loss) and the best evaluation's weights are the model saved. eval_every: null = the
    # checkpoint_every cadence, 0 = the last step only. patience: stop after that many evaluations
    # without improvement (0 = never stop early). dev_images: the first N val images scored (0 = all)
    eval_every: int | None = None
    select_on: Literal["auto", "loss"] = "auto"
    patience: int = 0
    dev_images: int = 200

    def check(self, p):
        positive(p, self, "grad_accum_steps")
        if self.checkpoint_every < 0:
            raise ParamError(f"{p}.checkpoint_every: must be >= 0 (0 = never), got {self.checkpoint_every}")
        if self.eval_every is not None and self.eval_every < 0:
            raise ParamError(f"{p}.eval_every: must be >= 0 (0 = the last step only, null = checkpoint_every), "
                             f"got {self.eval_every}")
        if self.patience < 0:
            raise ParamError(f"{p}.patience: must be >= 0 (0 = never stop early), got {self.patience}")
        if self.patience and (self.checkpoint_every if self.eval_every is None else self.eval_every) == 0:
            raise ParamError(f"{p}.patience: {self.patience} needs evaluations during training, but train.eval_every "
                             f"(or checkpoint_every, when eval_every is null) is 0: set it, or patience: 0")
        if self.dev_images < 0:
            raise ParamError(f"{p}.dev_images: must be >= 0 (0 = the whole val split), got {self.dev_images}")
        if self.threads < 0:
            raise ParamError(f"{p}.threads: must be >= 0 (0 = auto), got {self.threads}")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise ParamError(f"{p}.device: {self.device!r} is not auto, cpu, cuda[:N] or mps")
        from .runtime import missing_device  # imports torch: only once the spelling is right

        problem = missing_device(self.device)
        if problem:
            raise ParamError(f"{p}.device: {problem}")


@dataclass
class EvaluateConfig:
    batch_size: int = 64
    max_images: int = 0  # 0 = the whole test split
    picture_images: int = 8
    # captioners: the decodings scored side by side (metrics/<variant>.json "decodings"), besides the
    # variant's own decoding (the headline); beam uses the variant's decoding.beam_size
    decodings: list[Literal["greedy", "beam", "greedy_block_trigrams", "beam_block_trigrams"]] = field(
        default_factory=lambda: ["greedy", "beam"])
    # alignment: also score query-bank normalisation (QB-Norm's inverted softmax: each gallery item's
    # similarity lowered by how strongly training queries already prefer it), metrics qb_*, beside
    # the raw numbers: a bank of this many training images and one caption of each (0 = off), each
    # direction's inverse temperature chosen on the dev split among querybank_betas (or raw scores)
    querybank_images: int = 0
    querybank_betas: list[float] = field(default_factory=lambda: [5.0, 10.0, 15.0, 20.0, 30.0])
    # pixel variants (which run their image tower at evaluation): embed each test and dev image and
    # its mirror image and average the two (test-time augmentation; the query bank stays single-view);
    # the cached grids of ``variants`` are made once by the features stage and stay single-view
    test_time_flip: bool = False

    def check(self, p):
        positive(p, self, "batch_size")
        if self.max_images < 0:
            raise ParamError(f"{p}.max_images: must be >= 0 (0 = all), got {self.max_images}")
        if self.querybank_images < 0:
            raise ParamError(f"{p}.querybank_images: must be >= 0 (0 = off), got {self.querybank_images}")
        if self.querybank_images and (not self.querybank_betas or any(b <= 0 for b in self.querybank_betas)):
            raise ParamError(f"{p}.querybank_betas: needs one or more positive inverse temperatures, got {self.querybank_betas}")


@dataclass
class TrackingConfig:
    experiment: str = "vlbench"


SECTIONS = {
    "data": DataConfig,
    "split": SplitConfig,
    "features": FeaturesConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
    "transfer": TransferConfig,
}



def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params: file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"params: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamError(f"params: {path} must hold a mapping of sections")
    return raw


def section(raw: dict, name: str):
    """One validated section of params.yaml (a missing section takes the defaults)."""
    cls = SECTIONS[name]
    sub = raw.get(name, {})
    if sub is None:
        sub = {}
    return build(cls, sub, name)


# Variants live in two groups: ``variants`` train on the features stage's cached image tokens;
# ``pixel_variants`` read pixels and tune the image encoder (end to end), so DVC runs them without
# the features stage (dvc.yaml: train_pixels / evaluate_pixels).
VARIANT_GROUPS = ("variants", "pixel_variants")


def variant_group(raw: dict, name: str) -> str:
    """Which group of params.yaml holds variant ``name``."""
    for group in VARIANT_GROUPS:
        if name in (raw.get(group) or {}):
            return group
    known = [n for g in VARIANT_GROUPS for n in (raw.get(g) or {})]
    raise ParamError(f"variants.{name}: unknown variant (known: {', '.join(known) or 'none'})")


def variant_params(raw: dict, name: str) -> dict:
    """The raw params of variant ``name``, whichever group holds it."""
    return raw[variant_group(raw, name)][name]


def variant_names(raw: dict) -> list[str]:
    return [n for g in VARIANT_GROUPS for n in (raw.get(g) or {})]
