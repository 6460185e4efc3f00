"""Use a trained variant outside the pipeline: caption image files, or search images by text.

    from vlbench.inference import Captioner
    cap = Captioner.from_run("models/grid_transformer")
    cap.caption(["a.jpg", "b.jpg"])            # -> ["a red circle ...", ...]
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .models.trained import load_trained
from .models.protocols import AlignmentModel, CaptioningModel
from .models.registry import create_image_encoder
from .runtime import load_image, pick_device, to_tensor


class ImageError(ValueError):
    """An input file that is missing or not a readable image."""


# Larger images are refused before their pixels are decoded: a small file can declare a huge size
# (a decompression bomb) and would take gigabytes to load. 50 MP is above any camera photo's size.
MAX_PIXELS = 50_000_000


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _load_checked(source, name: str, size: int):
    """``source``: a path or a binary file object; ``name``: what error messages call it."""
    try:
        with Image.open(source) as im:  # lazy: reads the header only
            width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own limit (above ours) trips while opening
        raise ImageError(f"{name}: too many pixels ({_why(e)})") from None
    except UnidentifiedImageError:  # its message names the file object, which says nothing here
        raise ImageError(f"{name}: not a readable image (no image format recognised)") from None
    except Exception as e:
        raise ImageError(f"{name}: not a readable image ({_why(e)})") from None
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} pixels, more than the {MAX_PIXELS} allowed")
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        return load_image(source, size)
    except Exception as e:  # PIL raises several types: truncated, broken data
        raise ImageError(f"{name}: not a readable image ({_why(e)})") from None


def read_image(path: str, size: int):
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{path}: no such file")
    if p.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    return _load_checked(str(p), path, size)


def decode_image(data: bytes, size: int, name: str = "image"):
    """An image file's bytes (e.g. from an HTTP request) -> RGB image, as ``read_image`` loads a file."""
    if not data:
        raise ImageError(f"{name}: empty")
    return _load_checked(io.BytesIO(data), name, size)


@contextlib.contextmanager
def trained_folder(model: str | Path):
    """The trained model folder (config.json + model.safetensors) for ``model``: a folder, or an
    MLflow model URI (``models:/<name>@champion``, ``runs:/<id>/model``) of a model the evaluate
    stage logged (``serving.py``), which ships one; that is downloaded for the ``with`` block only."""
    if Path(model).exists() or not re.match(r"[a-zA-Z][\w+.-]+:/", str(model)):  # "C:/x" is a folder, not a URI
        yield Path(model)
        return
    import mlflow

    from .tracking import default_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    with tempfile.TemporaryDirectory(prefix="vlbench-model-") as dest:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model), dst_path=dest, tracking_uri=uri))
        found = sorted(c.parent for c in root.rglob("config.json") if (c.parent / "model.safetensors").is_file())
        if not found:
            raise FileNotFoundError(f"{model}: no trained model folder (config.json + model.safetensors) in it")
        yield found[0]


class _Trained:
    def __init__(self, model_dir: str | Path, device: str = "auto"):
        self.device = pick_device(device)
        self.model, self.cfg, self.meta = load_trained(model_dir)
        self.model.to(self.device)
        self.encoder = create_image_encoder(self.meta["image_encoder"]).to(self.device).eval()
        self.image_size = self.meta["image_size"]  # the size its cached training features were made at

    @classmethod
    def from_run(cls, model_dir: str | Path = None, variant: str | None = None, device: str = "auto"):
        """A trained model folder (``models/<variant>`` by default for ``variant``), or an MLflow
        model URI such as ``models:/<variant>@champion`` (``trained_folder``)."""
        with trained_folder(model_dir or Path("models") / variant) as folder:
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder}: no trained model here (run `dvc repro` or the train stage first)")
            return cls(folder, device)  # reads the weights into memory: the download can go

    @torch.no_grad()
    def grid(self, images) -> torch.Tensor:
        x = torch.stack([to_tensor(im, self.encoder.mean, self.encoder.std) for im in images]).to(self.device)
        return self.encoder(x).half().float()  # same fp16 rounding as the cached training features


class Captioner(_Trained):
    model: CaptioningModel

    def caption(self, paths: list[str], decoding=None, seed: int = 0) -> list[str]:
        """One caption per path; raises ImageError for an unreadable one (see caption_each)."""
        return self.caption_images([read_image(p, self.image_size) for p in paths], decoding, seed)

    def caption_images(self, images: list, decoding=None, seed: int = 0) -> list[str]:
        """One caption per loaded image (``read_image``/``decode_image``), sampled from one seeded
        generator over the whole list: the same list and seed give the same captions."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return self.model.generate(self.grid(images), decoding or self.cfg.decoding, generator=gen)

    def caption_each(self, paths: list[str], decoding=None, seed: int = 0) -> list[str | ImageError]:
        """Caption what can be read; an ImageError in place of each file that cannot."""
        loaded, out = [], []
        for p in paths:
            try:
                loaded.append(read_image(p, self.image_size))
                out.append(None)
            except ImageError as e:
                out.append(e)
        if loaded:
            caps = iter(self.caption_images(loaded, decoding, seed))
            out = [next(caps) if o is None else o for o in out]
        return out

    def decoding(self, beam: int | None = None, top_p: float | None = None, temperature: float | None = None, max_len=None):
        d = self.cfg.decoding
        if beam:
            d = replace(d, strategy="beam", beam_size=beam)
        if top_p is not None or temperature is not None:
            d = replace(d, strategy="nucleus", top_p=top_p if top_p is not None else d.top_p,
                        temperature=temperature if temperature is not None else d.temperature)
        if max_len:
            d = replace(d, max_len=max_len)
        return d


class Searcher(_Trained):
    """Text -> images over an index of images (the test split by default): their cached features,
    or, for a variant that tuned its image encoder (``pixel_variants``), the image files."""

    model: AlignmentModel
    flip = False  # a pixel variant embeds each image and its mirror image (evaluate.test_time_flip)

    @torch.no_grad()
    def index(self, features: np.ndarray | None, paths: list[str], batch_size: int = 64) -> None:
        chunks = []
        for s in range(0, len(paths), batch_size):
            if features is not None:
                tokens = torch.from_numpy(np.array(features[s : s + batch_size])).to(self.device)
                chunks.append(self.model.embed_images(tokens))
            else:
                chunks.append(self.embed_images([read_image(p, self.image_size) for p in paths[s : s + batch_size]]))
        self.use_index(torch.cat(chunks), paths)

    def use_index(self, image_emb, names: list[str], qb_beta: float = 0.0, qb_offsets=None) -> None:
        """Search over these image embeddings (e.g. a served model's stored index), named ``names``.
        ``qb_beta`` > 0: rank by query-bank normalisation, ``qb_beta`` x cosine - ``qb_offsets`` (one
        per image: ``vlbench.scoring.search_offsets``); 0: by cosine."""
        self.image_emb, self.paths = torch.as_tensor(image_emb, dtype=torch.float32).to(self.device), list(names)
        if qb_beta and (qb_offsets is None or len(qb_offsets) != len(self.paths)):
            raise ValueError(f"query-bank normalisation needs one offset per image ({len(self.paths)})")
        self.qb_beta = float(qb_beta)
        self.qb_offsets = torch.as_tensor(qb_offsets, dtype=torch.float32).to(self.device) if qb_beta else None

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        """Loaded images -> L2-normalised embeddings, as the index embeds them."""
        if self.meta.get("input") == "pixels":  # the model tuned its own encoder: it takes pixels
            from .scoring import embed_image_batches

            x = torch.stack([to_tensor(im, self.encoder.mean, self.encoder.std) for im in images]).to(self.device)
            return embed_image_batches(self.model, [x], self.flip)
        return self.model.embed_images(self.grid(images))  # the cached features' encoder and rounding

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> L2-normalised embeddings."""
        return self.model.embed_text_features(self.model.text_features(list(texts), self.device))

    @torch.no_grad()
    def search(self, query: str, top: int = 5) -> list[tuple[str, float]]:
        scores = self.image_emb @ self.embed_texts([query])[0]
        if self.qb_beta:
            scores = self.qb_beta * scores - self.qb_offsets
        scores = scores.cpu()
        best = scores.topk(min(top, len(scores)))
        return [(self.paths[i], s.item()) for s, i in zip(best.values, best.indices.tolist())]
