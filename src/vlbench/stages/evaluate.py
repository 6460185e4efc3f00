"""Stage `evaluate`: score one trained variant on the test split.

Alignment: recall@1/5/10 both ways (5 captions per image grouped), median/mean rank, next to
chance. Captioning: pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when available), next
to a chance baseline (a random training caption per image). Both: speed and peak memory.
Writes ``metrics/<variant>.json``, ``metrics/pictures/<variant>.png`` and, for captioners,
``metrics/<variant>_captions.json``; logs them to the variant's MLflow run.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import io
from ..config import load_params, section
from ..metrics.retrieval import chance_recall, retrieval_metrics
from ..models.factory import load_trained
from ..runtime import pick_device, seed_everything
from ..tracking import Tracker
from .features import load_features
from .split import read_manifest


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


@torch.no_grad()
def evaluate_alignment(model, feats, captions, paths, device, batch_size, n_pictures, picture_path):
    t0 = time.perf_counter()
    img = torch.cat([model.embed_images(torch.from_numpy(np.array(feats[s : s + batch_size])).to(device))
                     for s in range(0, len(feats), batch_size)])
    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    txt = []
    for s in tqdm(range(0, len(flat), batch_size), desc="embed captions", unit="batch"):
        txt.append(model.embed_text_features(model.text_features(flat[s : s + batch_size], device)))
    txt = torch.cat(txt)
    sim = img @ txt.t()
    seconds = time.perf_counter() - t0
    metrics = retrieval_metrics(sim, owner.to(device))
    per_image = max(1, round(len(flat) / len(captions)))
    chance = chance_recall(len(captions), per_image)
    speed = {"queries_per_s": len(flat) / seconds, "ms_per_1000_queries": seconds / len(flat) * 1e6}
    # gallery: a few caption queries -> top-5 images
    picks = list(range(0, len(flat), max(1, len(flat) // n_pictures)))[:n_pictures]
    results = []
    for j in picks:
        top = sim[:, j].topk(5)
        results.append([(paths[i], s.item(), i == owner[j].item()) for s, i in zip(top.values, top.indices.tolist())])
    from ..pictures import retrieval_gallery

    retrieval_gallery([flat[j] for j in picks], results, picture_path)
    return metrics, {"chance": chance}, speed, None


def nearest_neighbour_captions(test_feats, train_feats, train_captions: list[list[str]], chunk: int = 1024) -> list[str]:
    """Baseline: each test image gets the first caption of its most similar training image
    (cosine similarity of mean-pooled image features)."""
    def pooled(f):
        out = [torch.nn.functional.normalize(torch.from_numpy(np.array(f[s : s + chunk])).float().mean(1), dim=-1)
               for s in range(0, len(f), chunk)]
        return torch.cat(out)

    nearest = (pooled(test_feats) @ pooled(train_feats).t()).argmax(1)
    return [train_captions[i][0] for i in nearest.tolist()]


def evaluate_captioning(model, cfg, feats, captions, ids, paths, train_feats, train_captions, device, batch_size,
                        n_pictures, picture_path, seed):
    from ..metrics.caption import caption_metrics

    gen = torch.Generator(device=device).manual_seed(seed)
    hyps, t0 = [], time.perf_counter()
    for s in tqdm(range(0, len(feats), batch_size), desc=f"caption ({cfg.decoding.strategy})", unit="batch"):
        grid = torch.from_numpy(np.array(feats[s : s + batch_size])).to(device)
        hyps.extend(model.generate(grid, cfg.decoding, generator=gen))
    seconds = time.perf_counter() - t0
    refs = {i: list(c) for i, c in zip(ids, captions)}
    metrics = caption_metrics(refs, dict(zip(ids, hyps)))
    rng = random.Random(seed)
    chance_hyps = {i: rng.choice(rng.choice(train_captions)) for i in ids}
    chance = caption_metrics(refs, chance_hyps, spice=False)
    nn_hyps = dict(zip(ids, nearest_neighbour_captions(feats, train_feats, train_captions)))
    nearest = caption_metrics(refs, nn_hyps, spice=False)
    speed = {"captions_per_s": len(ids) / seconds}
    from ..pictures import caption_grid

    caption_grid(paths[:n_pictures], hyps[:n_pictures], [c[0] for c in captions[:n_pictures]], picture_path)
    generated = [{"image_id": i, "caption": h, "nearest_neighbour": nn_hyps[i], "references": refs[i]} for i, h in zip(ids, hyps)]
    return metrics, {"chance": chance, "nearest_neighbour": nearest}, speed, generated


def run(params_path: str, name: str, model_dir: str, features_dir: str, splits_dir: str, metrics_dir: str) -> None:
    raw = load_params(params_path)
    ecfg, tcfg, tracking = section(raw, "evaluate"), section(raw, "train"), section(raw, "tracking")
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    model, cfg, meta = load_trained(model_dir)
    model.to(device)
    feats, ids = load_features(features_dir, "test")
    df = read_manifest(splits_dir, "test").set_index("image_id").loc[ids]
    n = len(ids) if ecfg.max_images == 0 else min(ecfg.max_images, len(ids))
    feats, ids = feats[:n], ids[:n]
    captions = [list(c) for c in df["captions"][:n]]
    paths = list(df["path"][:n])
    metrics_dir = Path(metrics_dir)
    picture = metrics_dir / "pictures" / f"{name}.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    if cfg.family == "alignment":
        metrics, baselines, speed, generated = evaluate_alignment(
            model, feats, captions, paths, device, ecfg.batch_size, ecfg.picture_images, picture)
    else:
        train_feats, train_ids = load_features(features_dir, "train")
        by_id = dict(read_manifest(splits_dir, "train")[["image_id", "captions"]].itertuples(index=False))
        train_caps = [list(by_id[i]) for i in train_ids]
        metrics, baselines, speed, generated = evaluate_captioning(
            model, cfg, feats, captions, ids, paths, train_feats, train_caps, device, ecfg.batch_size,
            ecfg.picture_images, picture, tcfg.seed)
    speed["peak_memory_mb"] = peak_memory_mb(device)
    result = {"variant": name, "family": cfg.family, "model": cfg.model, "split": "test", "images": n,
              "captions": sum(map(len, captions)), "metrics": metrics, **baselines, "speed": speed,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if generated is not None:
        io.write_json(metrics_dir / f"{name}_captions.json", generated)
    io.write_json(metrics_dir / f"{name}.json", result)

    with Tracker(tracking.experiment, name, Path(model_dir) / "run_id", resume=True) as mlflow:
        numeric = {f"test_{k}".replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, float)}
        numeric.update({f"test_{k}": v for k, v in speed.items()})
        mlflow.log_metrics(numeric)
        mlflow.log_artifact(str(metrics_dir / f"{name}.json"), "evaluation")
        mlflow.log_artifact(str(picture), "pictures")
        if generated is not None:
            mlflow.log_artifact(str(metrics_dir / f"{name}_captions.json"), "evaluation")
    print(json.dumps({"variant": name, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()}}))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (reads evaluate, train, tracking)")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--model", default=None, help="trained model folder (default models/<variant>)")
    ap.add_argument("--features", required=True, help="features folder of the variant's image encoder")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--metrics", default="metrics", help="folder for <variant>.json and pictures/")
    a = ap.parse_args(argv)
    run(a.params, a.variant, a.model or f"models/{a.variant}", a.features, a.splits, a.metrics)
