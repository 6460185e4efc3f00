"""The whole pipeline for real: `dvc repro` in a temporary git repo on tiny params, then the
metrics JSON, the summary and the MLflow runs read back from the sqlite store."""
import json
import subprocess

import pytest
import yaml

from conftest import assert_recalls_match_naive_reference, env_with_venv, tiny_params

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env_with_venv(), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def dvc(*args, cwd):
    import sys
    from pathlib import Path

    return sh([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from conftest import copy_project

    project = copy_project(tmp_path_factory.mktemp("e2e"))
    params = tiny_params(n_images=40, steps=6)
    params["pixel_variants"] = {"clip_px": {  # end to end: LoRA in the image encoder, no features stage
        "family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0", "image_size": 64,
        "image_tuning": "lora", "optim": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "log_every": 1}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / ".gitignore").write_text("mlflow.db\nmlartifacts/\n/models/\n/data/\n")
    sh(["git", "init", "-q"], project)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], project)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], project)
    dvc("init", "-q", cwd=project)
    return project


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_end_to_end(repo):
    first = dvc("repro", cwd=repo)
    ran = stages_run(first.stdout)
    assert {"check", "download", "split", "features@efficientnet_lite0", "train@clip", "train@gridcap",
            "evaluate@clip", "evaluate@gridcap", "train_pixels@clip_px", "evaluate_pixels@clip_px", "report"} <= ran, first.stdout

    clip = json.loads((repo / "metrics/clip.json").read_text())
    assert clip["family"] == "alignment" and clip["images"] == 12 and clip["captions"] == 60
    # the recalls again, by a naive reference on the similarities of the trained model, recomputed here
    import numpy as np
    import pandas as pd
    import torch

    from vlbench.models.trained import load_trained

    model, _, _ = load_trained(repo / "models/clip")
    feats = repo / "data/features/efficientnet_lite0"
    order = json.loads((feats / "test_ids.json").read_text())
    captions = pd.read_parquet(repo / "data/splits/test.parquet").set_index("image_id").loc[order, "captions"]
    flat = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    with torch.no_grad():
        image = model.eval().embed_images(torch.from_numpy(np.load(feats / "test.npy")))
        sim = (image @ model.embed_text_features(model.text_features(flat, "cpu")).T).tolist()
    i2t = assert_recalls_match_naive_reference(clip["metrics"], sim, owner)
    first_hits = sorted(q.index(True) + 1 for q in i2t)
    assert clip["metrics"]["i2t_median_rank"] == first_hits[(len(first_hits) - 1) // 2]  # torch's (lower) median
    cap = json.loads((repo / "metrics/gridcap.json").read_text())
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"} <= set(cap["metrics"])
    assert len(json.loads((repo / "metrics/gridcap_captions.json").read_text())) == 12
    summary = (repo / "metrics/summary.md").read_text()
    assert "| clip |" in summary and "| gridcap |" in summary and "*chance*" in summary
    assert (repo / "metrics/pictures/clip.png").stat().st_size > 1000
    assert (repo / "metrics/curves.png").is_file()

    # MLflow: one run per variant in the sqlite store, with params, curves, test metrics, checkpoint, picture
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlbench-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"clip", "gridcap", "clip_px"}
    for name, r in runs.items():
        assert r.info.run_id == (repo / "models" / name / "run_id").read_text().strip()
        assert r.data.params["optim.steps"] == "6"
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 6
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [6]
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")}
        assert "checkpoint/model.safetensors" in arts
        assert [a.path for a in client.list_artifacts(r.info.run_id, "pictures")] == [f"pictures/{name}.png"]
    assert "test_i2t_R_at_1" in runs["clip"].data.metrics
    assert "test_CIDEr" in runs["gridcap"].data.metrics

    # a second repro does nothing
    second = dvc("repro", cwd=repo)
    assert stages_run(second.stdout) == set(), second.stdout

    # editing one variant's params re-runs only that variant (and the report); the params check
    # runs again, and writes the same stamp, so nothing else follows
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["variants"]["gridcap"]["optim"]["lr"] = 2e-3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc("repro", cwd=repo)
    assert stages_run(third.stdout) == {"check", "train@gridcap", "evaluate@gridcap", "report"}, third.stdout

    # new cached features re-run every variant that reads them; the pixel variant too, since its
    # stages declare features.image_size (their code reads it only with --features, which the
    # static dependency check of tests/test_dvc_deps.py cannot tell)
    params["features"]["image_size"] = 48
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc("repro", cwd=repo)
    assert stages_run(fourth.stdout) == {"check", "features@efficientnet_lite0", "train@clip", "train@gridcap", "evaluate@clip",
                                         "evaluate@gridcap", "train_pixels@clip_px", "evaluate_pixels@clip_px",
                                         "report"}, fourth.stdout
    assert "| clip_px |" in (repo / "metrics/summary.md").read_text()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header (IHDR, CRC fixed up) claims width x height."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then chunk length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_caption_command_on_good_and_bad_files(repo, tmp_path):
    good = sorted((repo / "data/raw/images").iterdir())[:2]
    missing = tmp_path / "missing.jpg"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:60])
    huge = tmp_path / "huge.png"  # header says 20000x20000: refused as a decompression bomb, never decoded
    huge.write_bytes(png_claiming_size(20000, 20000))
    files = [good[0], missing, empty, text, truncated, huge, good[1]]
    r = sh([sys_python(), "-m", "vlbench", "caption", *map(str, files), "--variant", "gridcap", "--beam", "2"], repo, check=False)
    assert r.returncode == 1
    out = r.stdout.splitlines()
    assert [line.split("\t")[0] for line in out] == [str(good[0]), str(good[1])]
    cli_captions = [line.split("\t")[1] for line in out]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5
    assert "no such file" in errors[0] and "empty file" in errors[1] and "not a readable image" in errors[2]

    from vlbench.inference import Captioner

    import os

    old = os.getcwd()
    os.chdir(repo)
    try:
        cap = Captioner.from_run(variant="gridcap")
        # the bad files in between do not change the good files' captions
        assert cap.caption([str(g) for g in good], cap.decoding(beam=2)) == cli_captions
        a = cap.caption([str(good[0])], cap.decoding(top_p=0.9, temperature=1.5), seed=3)
        b = cap.caption([str(good[0])], cap.decoding(top_p=0.9, temperature=1.5), seed=3)
        assert a == b and len(a) == 1
    finally:
        os.chdir(old)


def test_search_command(repo, tmp_path):
    gallery = tmp_path / "g.png"
    r = sh([sys_python(), "-m", "vlbench", "search", "a red circle on the left", "--variant", "clip", "--top", "3",
            "--gallery", str(gallery)], repo)
    hits = [line.split("\t") for line in r.stdout.splitlines() if "\t" in line]
    assert len(hits) == 3
    scores = [float(s) for s, _ in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert all((repo / p).is_file() for _, p in hits)
    assert gallery.stat().st_size > 1000
    r = sh([sys_python(), "-m", "vlbench", "search", "x", "--variant", "gridcap"], repo, check=False)
    assert r.returncode == 2 and "needs an alignment variant" in r.stderr


def sys_python() -> str:
    import sys

    return sys.executable
