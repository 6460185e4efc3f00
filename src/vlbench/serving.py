"""A trained variant as MLflow pyfunc models, for `mlflow models serve` (issue #15, item 1).

The evaluate stage saves them here and logs them into the variant's run:

- captioners, artifact ``model``: column ``image`` (base64 image file bytes) -> column ``caption``;
  params ``beam``, ``top_p``, ``temperature``, ``max_len``, ``seed`` mean what the ``vlbench caption``
  options do (0 = not given: the variant's own decoding);
- alignment variants, artifact ``model``: columns ``text`` and/or ``image`` -> ``text_embedding``,
  ``image_embedding`` (L2-normalised; None where that column was empty); and ``search_model``: column
  ``text`` -> ``image_ids``, ``scores``, the ``top_k`` (param, default 5) best test images, from an
  index of the evaluated test images shipped with it. They rank as the evaluation's t2i metrics do:
  by cosine, or, where the evaluation chose query-bank normalisation on dev (``qb_beta_t2i`` > 0),
  by its normalised score ``beta * cosine - offset(image)`` (``vlbench.scoring.search_offsets``),
  which is then what ``scores`` holds.

Each ships the trained model folder (config.json + model.safetensors, artifact ``trained``) and runs
it through ``vlbench.inference``, so a served caption is the ``vlbench caption`` one. The models
need vlbench installed where they are served: ``mlflow models serve ... --env-manager local``.
A bad request (not base64, not an image, too many pixels, no rows) is a 400 with a one-line reason.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

CAPTION_PARAMS = ParamSchema([ParamSpec("beam", DataType.long, 0), ParamSpec("top_p", DataType.double, 0.0),
                              ParamSpec("temperature", DataType.double, 0.0), ParamSpec("max_len", DataType.long, 0),
                              ParamSpec("seed", DataType.long, 0)])
CAPTION_SIGNATURE = ModelSignature(Schema([ColSpec(DataType.string, "image")]),
                                   Schema([ColSpec(DataType.string, "caption")]), CAPTION_PARAMS)
EMBED_SIGNATURE = ModelSignature(
    Schema([ColSpec(DataType.string, "text", required=False), ColSpec(DataType.string, "image", required=False)]),
    Schema([ColSpec(Array(DataType.float), "text_embedding", required=False),
            ColSpec(Array(DataType.float), "image_embedding", required=False)]))
SEARCH_SIGNATURE = ModelSignature(
    Schema([ColSpec(DataType.string, "text")]),
    Schema([ColSpec(Array(DataType.string), "image_ids"), ColSpec(Array(DataType.double), "scores")]),
    ParamSchema([ParamSpec("top_k", DataType.long, 5)]))


class BadRequest(MlflowException):
    """A 400 whose message is just ``reason``. MLflow's scoring server rewrites an exception's message
    to ``Failed to predict data '<the whole request>'...``: megabytes of base64 sent back for one bad
    image, and not one line. This message ignores that rewrite."""

    def __init__(self, reason: str):
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value) -> None:
        pass  # the scoring server's echo of the request


def encode_image_file(path: str | Path) -> str:
    """An image file as the ``image`` column wants it."""
    return base64.b64encode(Path(path).read_bytes()).decode()


def _column(model_input, name: str) -> list:
    if isinstance(model_input, pd.DataFrame):
        values = model_input[name].tolist() if name in model_input else []
    else:
        values = [row.get(name) for row in model_input]
    if not values:
        raise BadRequest("no rows in the request")
    return values


def _image(text, row: int, size: int):
    from .inference import ImageError, decode_image

    if not isinstance(text, str) or not text:
        raise BadRequest(f"row {row}: no image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"row {row}: image is not base64 ({e})") from None
    try:
        return decode_image(data, size, f"row {row}")
    except ImageError as e:
        raise BadRequest(str(e)) from None


def _load(context, cls):
    from .runtime import configure_threads

    configure_threads()  # VLBENCH_JOBS / OMP_NUM_THREADS, as the commands do
    return cls.from_run(context.artifacts["trained"])


class _Model(mlflow.pyfunc.PythonModel):
    # The signatures are explicit (below): no "add type hints to predict" warning, no type-hint wrapper
    _skip_type_hint_validation = True


class CaptionModel(_Model):
    def load_context(self, context):
        from .inference import Captioner

        self.captioner = _load(context, Captioner)

    def predict(self, context, model_input, params=None):
        p = params or {}
        if p.get("beam") and p.get("top_p"):  # as `vlbench caption`: --beam and --top-p exclude each other
            raise BadRequest("give beam or top_p, not both")
        cap = self.captioner
        images = [_image(x, i, cap.image_size) for i, x in enumerate(_column(model_input, "image"))]
        decoding = cap.decoding(p.get("beam") or None, p.get("top_p") or None, p.get("temperature") or None,
                                p.get("max_len") or None)
        return pd.DataFrame({"caption": cap.caption_images(images, decoding, int(p.get("seed") or 0))})


class EmbedModel(_Model):
    def load_context(self, context):
        from .inference import Searcher

        self.searcher = _load(context, Searcher)

    def predict(self, context, model_input, params=None):
        s = self.searcher
        rows = pd.DataFrame(model_input)
        if rows.empty:
            raise BadRequest("no rows in the request")
        texts = rows["text"].tolist() if "text" in rows else [None] * len(rows)
        images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
        out = pd.DataFrame({"text_embedding": [None] * len(rows), "image_embedding": [None] * len(rows)}, dtype=object)
        given = lambda v: isinstance(v, str) and v != ""  # noqa: E731  (pandas fills a missing cell with None/NaN)
        for i, (t, im) in enumerate(zip(texts, images)):
            if not (given(t) or given(im)):
                raise BadRequest(f"row {i}: neither text nor image")
        with_text = [i for i, t in enumerate(texts) if given(t)]
        with_image = [i for i, im in enumerate(images) if given(im)]
        if with_text:
            for i, e in zip(with_text, s.embed_texts([texts[i] for i in with_text]).cpu().tolist()):
                out.at[i, "text_embedding"] = e
        if with_image:
            loaded = [_image(images[i], i, s.image_size) for i in with_image]
            for i, e in zip(with_image, s.embed_images(loaded).cpu().tolist()):
                out.at[i, "image_embedding"] = e
        return out


class SearchModel(_Model):
    def load_context(self, context):
        from .inference import Searcher

        self.searcher = _load(context, Searcher)
        index = np.load(context.artifacts["index"])
        qb = {"qb_beta": float(index["qb_beta"]), "qb_offsets": index["qb_offsets"]} if "qb_beta" in index else {}
        self.searcher.use_index(index["embeddings"], index["image_ids"].tolist(), **qb)

    def predict(self, context, model_input, params=None):
        top = int((params or {}).get("top_k", 5))
        if top < 1:
            raise BadRequest("top_k must be at least 1")
        hits = []
        for i, text in enumerate(_column(model_input, "text")):
            if not isinstance(text, str) or not text:
                raise BadRequest(f"row {i}: no text")
            hits.append(self.searcher.search(text, top))
        return pd.DataFrame({"image_ids": [[h[0] for h in row] for row in hits],
                             "scores": [[h[1] for h in row] for row in hits]})


def _requirements() -> list[str]:
    """Pinned by hand: MLflow would otherwise load the model in a subprocess to find out (seconds).
    vlbench itself is not on PyPI, hence `--env-manager local`."""
    import PIL
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"pillow=={PIL.__version__}"]


@contextlib.contextmanager
def _quiet_mlflow():
    """No "CloudPickle requires caution" and "validating input example" lines in each evaluate log."""
    log = logging.getLogger("mlflow.pyfunc")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def save_models(model_dir: str | Path, family: str, dest: str | Path, example_image: str | None = None,
                index: dict | None = None) -> dict[str, Path]:
    """Save the variant's pyfunc models under ``dest`` -> {artifact path: folder} to log.

    ``example_image``: an image file for the input example (none without it). ``index``: the search
    model's images, ``image_ids`` and ``embeddings``, with ``qb_beta`` and ``qb_offsets`` where query-bank
    normalisation ranks them (``vlbench.scoring.score_test_split``; no search model without it).
    The explicit signatures keep MLflow from running the model on the example to infer one."""
    dest, trained = Path(dest), {"trained": str(model_dir)}
    image = [encode_image_file(example_image)] if example_image else None
    common = {"artifacts": trained, "pip_requirements": _requirements()}
    with _quiet_mlflow():
        return _save(dest, family, image, index, trained, common)


def _save(dest: Path, family: str, image, index, trained: dict, common: dict) -> dict[str, Path]:
    saved = {}
    if family == "captioning":
        example = pd.DataFrame({"image": image}) if image else None
        mlflow.pyfunc.save_model(dest / "model", python_model=CaptionModel(), signature=CAPTION_SIGNATURE,
                                 input_example=example, **common)
        saved["model"] = dest / "model"
        return saved
    example = pd.DataFrame({"text": ["a photo of a dog"], "image": image}) if image else pd.DataFrame({"text": ["a photo of a dog"]})
    mlflow.pyfunc.save_model(dest / "model", python_model=EmbedModel(), signature=EMBED_SIGNATURE,
                             input_example=example, **common)
    saved["model"] = dest / "model"
    if index is not None:
        dest.mkdir(parents=True, exist_ok=True)
        arrays = {"image_ids": np.array([str(i) for i in index["image_ids"]]),
                  "embeddings": np.asarray(index["embeddings"], np.float32)}
        if index.get("qb_beta"):
            arrays |= {"qb_beta": np.float32(index["qb_beta"]), "qb_offsets": np.asarray(index["qb_offsets"], np.float32)}
        np.savez(dest / "index.npz", **arrays)
        mlflow.pyfunc.save_model(dest / "search_model", python_model=SearchModel(), signature=SEARCH_SIGNATURE,
                                 input_example=(pd.DataFrame({"text": ["a photo of a dog"]}), {"top_k": 5}),
                                 artifacts={**trained, "index": str(dest / "index.npz")},
                                 pip_requirements=common["pip_requirements"])
        saved["search_model"] = dest / "search_model"
    return saved
