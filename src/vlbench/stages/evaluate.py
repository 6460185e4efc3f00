"""Stage `evaluate`: score one trained variant on the test split.

Alignment: recall@1/5/10 both ways (5 captions per image grouped), median/mean rank, next to
chance. Captioning: pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when available), next
to a chance baseline (a random training caption per image). Both: speed and peak memory.
Writes ``metrics/<variant>.json``, ``metrics/pictures/<variant>.png`` and, for captioners,
``metrics/<variant>_captions.json``; logs them to the variant's MLflow run, with the variant as
pyfunc models (serving.py) registered under its name (promotion.py: the ``champion`` alias).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from .. import io
from ..data.manifests import read_manifest
from ..errors import ParamError
from ..image_features import load_features
from ..inputs import check_features, open_inputs
from ..models.trained import load_trained
from ..params import load_params, section
from ..promotion import register_and_promote
from ..runtime import configure_threads, pick_device, seed_everything
from ..scoring import dev_split, evaluate_alignment, evaluate_captioning, peak_memory_mb
from ..serving import save_models
from ..tracking import Tracker, file_lock


def run(params_path: str, name: str, model_dir: str, features_dir: str, splits_dir: str, metrics_dir: str) -> None:
    started_at = time.time()  # the run's duration counts the evaluation (after its training)
    raw = load_params(params_path)
    ecfg, tcfg, tracking = section(raw, "evaluate"), section(raw, "train"), section(raw, "tracking")
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    model, cfg, meta = load_trained(model_dir)
    model.to(device)
    pixels = meta.get("input") == "pixels"
    if pixels == bool(features_dir):
        raise ParamError(f"{name}: " + ("a pixel variant reads images, not --features" if pixels else
                                        "needs --features (its cached image tokens)"))
    if features_dir:  # features of another encoder or image size would score silently wrong
        fmeta = check_features(features_dir, cfg.image_encoder, f"variants.{name}.image_encoder",
                               section(raw, "features").image_size)
        if meta.get("image_size") not in (None, fmeta["image_size"]):
            raise ParamError(f"variants.{name}: {model_dir} was trained on images resized to {meta['image_size']}, "
                             f"but {features_dir} holds {fmeta['image_size']}: train it again")
    inputs = open_inputs("test", splits_dir, features_dir, cfg)
    ids = inputs.ids
    df = read_manifest(splits_dir, "test").set_index("image_id").loc[ids]
    n = len(ids) if ecfg.max_images == 0 else min(ecfg.max_images, len(ids))
    ids = ids[:n]
    captions = [list(c) for c in df["captions"][:n]]
    paths = list(df["path"][:n])
    metrics_dir = Path(metrics_dir)
    picture = metrics_dir / "pictures" / f"{name}.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    if cfg.family == "alignment":
        metrics, baselines, speed, generated, image_emb = evaluate_alignment(
            model, inputs, captions, paths, device, ecfg.batch_size, ecfg.picture_images, picture, tcfg.seed,
            dev=dev_split(cfg, splits_dir, features_dir))
        search_index = (ids, image_emb.cpu().numpy())  # the served search model's images
    else:
        search_index = None
        feats = inputs.array[:n]
        train_feats, train_ids = load_features(features_dir, "train")
        by_id = dict(read_manifest(splits_dir, "train")[["image_id", "captions"]].itertuples(index=False))
        train_caps = [list(by_id[i]) for i in train_ids]
        metrics, baselines, speed, generated = evaluate_captioning(
            model, cfg, feats, captions, ids, paths, train_feats, train_caps, device, ecfg.batch_size,
            ecfg.picture_images, picture, tcfg.seed, ecfg.decodings)
    speed["peak_memory_mb"] = peak_memory_mb(device)
    result = {"variant": name, "family": cfg.family, "model": cfg.model, "split": "test", "images": n,
              "captions": sum(map(len, captions)), "metrics": metrics, **baselines, "speed": speed,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "params": meta["params"],
              "selection": meta.get("selection")}  # the dev evaluation that picked this model (train stage)
    if cfg.family == "alignment" and cfg.reranker.top_k:
        result["rerank_top_k"] = cfg.reranker.top_k
    if generated is not None:
        io.write_json(metrics_dir / f"{name}_captions.json", generated)
    io.write_json(metrics_dir / f"{name}.json", result)

    read = [splits_dir, features_dir or str(Path(splits_dir).parent / "raw")]  # their DVC hashes: lineage
    # the saved models stay on disk until the tracker closes: a fallback to the local store re-logs them
    with tempfile.TemporaryDirectory(prefix="vlbench-models-") as staging, \
            Tracker(tracking.experiment, name, Path(model_dir) / "run_id", resume=True, inputs=read,
                    context="evaluation", started_at=started_at) as mlflow:
        numeric = {f"test_{k}".replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, float)}
        numeric.update({f"test_{k}": v for k, v in speed.items()})
        for dname, vals in result.get("decodings", {}).items():  # captioners: every decoding scored
            numeric.update({f"test_{dname}_{k}": v for k, v in vals.items() if isinstance(v, float)})
        mlflow.log_metrics(numeric)
        mlflow.log_artifact(str(metrics_dir / f"{name}.json"), "evaluation")
        mlflow.log_artifact(str(picture), "pictures")
        if generated is not None:
            mlflow.log_artifact(str(metrics_dir / f"{name}_captions.json"), "evaluation")
        example = paths[0] if paths and Path(paths[0]).is_file() else None
        for artifact_path, folder in save_models(model_dir, cfg.family, staging, example, search_index).items():
            mlflow.log_artifacts(str(folder), artifact_path)
        data = raw.get("data") or {}
        register(mlflow, name, cfg.family, metrics, str(data.get("name")), str(data.get("root") or ""))
    print(json.dumps({"variant": name, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()}}))


def register(tracker: Tracker, name: str, family: str, metrics: dict, dataset: str, data_root: str) -> None:
    """The logged model as a new version of ``name`` in the run's store (promotion.py). A registry
    that fails is one line on stderr: the evaluation is done and logged."""
    # queued DVC experiments evaluate in parallel: one compares and moves the alias at a time
    dvc_tmp = io.project_root() / ".dvc" / "tmp"
    lock = file_lock(dvc_tmp / "vlbench-registry.lock") if dvc_tmp.parent.is_dir() else contextlib.nullcontext()
    try:
        with lock:
            register_and_promote(tracker.client, tracker.run_id, name, family, metrics, dataset, data_root)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"vlbench: {name} not registered in {tracker.uri} ({type(e).__name__}: {why})", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads evaluate, train, tracking, features.image_size)")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--model", default=None, help="trained model folder (default models/<variant>)")
    ap.add_argument("--features", default=None,
                    help="features folder of the variant's image encoder (not for pixel_variants, which read images)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--metrics", default="metrics", help="folder for <variant>.json and pictures/")
    a = ap.parse_args(argv)
    configure_threads(section(load_params(a.params), "train").threads)
    run(a.params, a.variant, a.model or f"models/{a.variant}", a.features, a.splits, a.metrics)
