"""Stage `transfer`: score every trained variant on the test split of another dataset.

The dataset is a local copy in any layout the download stage reads (params
``transfer.datasets.<label>: {name, root}``, or ``--name``/``--root`` for a one-off run). Its test
split is its own (Karpathy's json, Flickr8k's split files); a copy without a split of its own is
scored on a seeded sample of ``test_size`` images, or refused when that is not set. Its test images
are checked like the download stage's (``data.max_broken_fraction``) and encoded with each cached-
features variant's own image encoder at ``features.image_size``; pixel variants read the images.

Every variant gets the metrics and baselines of the evaluate stage (vlbench.scoring). The chance and
nearest-neighbour captioning baselines draw on the variant's own *training* split (the in-domain
``data/splits`` and ``data/features/<encoder>``): the transfer set is scored, never trained on.

Writes ``<out>/`` (``test.parquet``, ``report.json``, ``features/<encoder>/``) and ``<metrics>/``
(``<variant>.json``, ``<variant>_captions.json`` for captioners, ``pictures/<variant>.png``), both
built under temporary names and replaced together only once every variant is scored; then logs
``transfer_<label>_test_*`` metrics to each variant's own MLflow run.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .. import io
from ..data import layouts
from ..data.verify import verify_images
from ..errors import ParamError
from ..image_features import encode_paths
from ..models.registry import create_image_encoder, resolve_image_size
from ..params import TransferDataset, check_label, load_params, section, variant_names
from ..runtime import configure_threads, pick_device
from ..scoring import mlflow_test_metrics, score_test_split
from ..tracking import Tracker


def dataset_entry(raw: dict, label: str, name: str | None = None, root: str | None = None,
                  test_size: int | None = None) -> TransferDataset:
    """``transfer.datasets.<label>`` of params.yaml, or the one given on the command line."""
    from ..config import build

    check_label("transfer.datasets", label)
    if root is not None or name is not None:
        if not (root and name):
            raise ParamError("transfer: a one-off dataset needs both --name and --root")
        entry = {"name": name, "root": root, **({"test_size": test_size} if test_size else {})}
        return build(TransferDataset, entry, f"transfer.datasets.{label}")
    datasets = section(raw, "transfer").datasets
    if label not in datasets:
        raise ParamError(f"transfer.datasets.{label}: not in params.yaml (known: {', '.join(datasets) or 'none'}); "
                         f"add it, or pass --name and --root")
    return datasets[label]


def test_records(entry: TransferDataset, label: str) -> tuple[list[dict], dict]:
    """The test images of the copy (its own split, or a seeded sample) and the layout report."""
    root = io.project_root() / entry.root
    try:
        records, report = layouts.read(entry.name, root)
    except ParamError as e:  # the layout reader names data.root; here the key is this entry's
        raise ParamError(f"transfer.datasets.{label}.root: {str(e).removeprefix('data.root: ')}") from None
    if any(r["split"] for r in records):
        test = [r for r in records if r["split"] == "test"]
        if not test:
            raise ParamError(f"transfer.datasets.{label}: {root} has no test split (its {report['split_source']} "
                             f"split lists {', '.join(sorted({r['split'] for r in records}))} images only)")
    elif entry.test_size is None:
        raise ParamError(f"transfer.datasets.{label}.test_size: {root} ({report['layout']}) has no split of its "
                         f"own, so no test split; set test_size to score a seeded sample of its {len(records)} images")
    elif entry.test_size > len(records):
        raise ParamError(f"transfer.datasets.{label}.test_size: {entry.test_size} but {root} holds {len(records)} images")
    else:
        test = sorted(random.Random(entry.seed).sample(records, entry.test_size), key=lambda r: r["image_id"])
        report["split_source"] = f"seeded sample of {entry.test_size} (seed {entry.seed})"
    return test, report


def prepare(entry: TransferDataset, label: str, raw: dict, encoders: set[str], out: Path, device) -> dict:
    """Into ``out`` (a fresh folder): the checked test manifest, its report and each encoder's features."""
    test, report = test_records(entry, label)
    max_broken = section(raw, "data").max_broken_fraction
    test, checked = verify_images(test, out, max_broken)
    if not test:
        raise ParamError(f"transfer.datasets.{label}: none of its test images could be read")
    per_image = Counter(len(r["captions"]) for r in test)
    report = {"dataset": entry.name, "label": label, **report, "test_images": len(test),
              "test_captions": sum(len(r["captions"]) for r in test),
              "captions_per_image": {str(k): per_image[k] for k in sorted(per_image)}, **checked}
    pd.DataFrame([{"image_id": r["image_id"], "path": r["path"], "captions": list(r["captions"]), "split": "test"}
                  for r in test]).to_parquet(out / "test.parquet", index=False)
    io.write_json(out / "report.json", report)
    fcfg = section(raw, "features")
    paths = [r["path"] for r in test]
    for backbone in sorted(encoders):  # the features stage's encoding, on the transfer test images
        encoder = create_image_encoder(backbone)
        size = resolve_image_size(fcfg.image_size, backbone)
        feats = encode_paths(encoder, paths, size, fcfg.batch_size, device, desc=f"{label} {backbone}")
        d = out / "features" / backbone
        d.mkdir(parents=True)
        np.save(d / "test.npy", feats)
        io.write_json(d / "test_ids.json", [r["image_id"] for r in test])
        io.write_json(d / "meta.json", {"backbone": backbone, "image_size": size, "image_size_param": fcfg.image_size,
                                        "dim": encoder.dim, "splits": {"test": {"images": len(test),
                                                                                "shape": list(feats.shape)}}})
    return report


def run(params_path: str, label: str, out: str, metrics: str, models: str = "models", features: str = "data/features",
        splits: str = "data/splits", variants: list[str] | None = None, name: str | None = None,
        root: str | None = None, test_size: int | None = None) -> None:
    raw = load_params(params_path)
    entry = dataset_entry(raw, label, name, root, test_size)
    tcfg, tracking = section(raw, "train"), section(raw, "tracking")
    known = variant_names(raw)
    names = variants or known
    for v in names:
        if v not in known:
            raise ParamError(f"variants.{v}: unknown variant (known: {', '.join(known)})")
        if not (Path(models) / v / "config.json").is_file():
            raise ParamError(f"variants.{v}: no trained model in {Path(models) / v} (run its train stage first)")
    metas = {v: json.loads((Path(models) / v / "config.json").read_text()) for v in names}
    encoders = {m["params"]["image_encoder"] for m in metas.values() if m.get("input") != "pixels"}
    device = pick_device(tcfg.device)
    out, metrics_dir = Path(out), Path(metrics)
    results, started = {}, {}
    with io.atomic_dir(out) as data_tmp, io.atomic_dir(metrics_dir) as metrics_tmp:
        if variants and metrics_dir.is_dir():  # scoring some variants keeps the others' results
            shutil.copytree(metrics_dir, metrics_tmp, dirs_exist_ok=True)
        report = prepare(entry, label, raw, encoders, data_tmp, device)
        for v in names:
            t0 = time.time()
            pixels = metas[v].get("input") == "pixels"
            encoder = metas[v]["params"]["image_encoder"]
            results[v] = score_test_split(
                v, Path(models) / v, raw, data_tmp, None if pixels else data_tmp / "features" / encoder,
                Path(splits), None if pixels else Path(features) / encoder, metrics_tmp, device,
                extra={"transfer": {k: report[k] for k in ("label", "dataset", "layout", "root", "split_source")}})[0]
            started[v] = t0
    for v, result in results.items():  # both folders complete: now the runs
        with Tracker(tracking.experiment, v, Path(models) / v / "run_id", resume=True, context="transfer",
                     started_at=started[v], owns_run_id=False) as mlflow:
            mlflow.log_metrics({f"transfer_{label}_{k}": x for k, x in mlflow_test_metrics(result).items()})
            mlflow.log_artifact(str(metrics_dir / f"{v}.json"), f"transfer/{label}")
            mlflow.log_artifact(str(metrics_dir / "pictures" / f"{v}.png"), f"transfer/{label}")
            if (metrics_dir / f"{v}_captions.json").is_file():
                mlflow.log_artifact(str(metrics_dir / f"{v}_captions.json"), f"transfer/{label}")
    print(json.dumps({"dataset": label, "test_images": report["test_images"],
                      **{v: {k: round(x, 2) for k, x in r["metrics"].items() if isinstance(x, float)}
                         for v, r in results.items()}}))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench transfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml",
                    help="params file (reads transfer, variants, evaluate, train, tracking, features, data.max_broken_fraction)")
    ap.add_argument("--dataset", required=True, help="label: an entry of transfer.datasets, or a new name with --name/--root")
    ap.add_argument("--name", default=None, choices=["flickr8k", "flickr30k", "coco"],
                    help="one-off: which dataset's layouts --root is in (instead of params)")
    ap.add_argument("--root", default=None, help="one-off: the folder of the copy (instead of params)")
    ap.add_argument("--test-size", type=int, default=None, help="one-off: for a copy without a split of its own")
    ap.add_argument("--variant", action="append", default=None, help="score only this trained variant (repeatable)")
    ap.add_argument("--models", default="models", help="folder of the trained variants (models/<variant>)")
    ap.add_argument("--features", default="data/features", help="the in-domain features (captioning baselines)")
    ap.add_argument("--splits", default="data/splits", help="the in-domain splits (captioning baselines)")
    ap.add_argument("--out", default=None, help="prepared test split and features (default data/transfer/<label>)")
    ap.add_argument("--metrics", default=None, help="results folder (default metrics/transfer/<label>)")
    a = ap.parse_args(argv)
    configure_threads(section(load_params(a.params), "train").threads)
    run(a.params, a.dataset, a.out or f"data/transfer/{a.dataset}", a.metrics or f"metrics/transfer/{a.dataset}",
        a.models, a.features, a.splits, a.variant, a.name, a.root, a.test_size)
