"""Served models and the registry for real (issue #15, items 1 and 2): the evaluate stage logs and
registers the tiny project's variants in a sqlite store; `mlflow models serve` serves them on
127.0.0.1; their answers are checked against the `caption` and `search` commands'."""
import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import env_with_venv, prepare_features, run_cli, tiny_params


def evaluate(d: Path, variant: str, uri: str) -> subprocess.CompletedProcess:
    env = env_with_venv() | {"MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "vlbench", "evaluate", "--variant", variant, "--features",
                           "data/features/efficientnet_lite0"], cwd=d, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Both tiny variants trained and evaluated (so logged and registered) into ``mlflow.db``."""
    params = tiny_params(n_images=30, steps=3)
    params["evaluate"]["decodings"] = []  # only the variant's own decoding: a faster evaluate
    params["variants"]["gridcap"]["optim"]["steps"] = 80  # captions that differ by image and decoding
    d = prepare_features(tmp_path_factory.mktemp("served"), params)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = env_with_venv() | {"MLFLOW_TRACKING_URI": uri}
    for variant in ("clip", "gridcap"):
        r = subprocess.run([sys.executable, "-m", "vlbench", "train", "--variant", variant, "--features",
                            "data/features/efficientnet_lite0"], cwd=d, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = evaluate(d, variant, uri)
        assert r.returncode == 0, r.stderr
        assert f"{variant} version 1" in r.stderr and "first champion" in r.stderr
    return d


def store(d: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")


def split_images(d: Path, n: int = 2) -> list[str]:
    from vlbench.data.manifests import read_manifest

    return [p for p in read_manifest(str(d / "data/splits"), "test")["path"][:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(d: Path, model_uri: str):
    """`mlflow models serve` of ``model_uri`` on a free port of 127.0.0.1 -> its /invocations URL."""
    import requests

    port = free_port()
    log = open(d / f"serve-{port}.log", "w")
    env = env_with_venv() | {"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, (d / f"serve-{port}.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail(f"{model_uri} not served: {(d / f'serve-{port}.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def post(url: str, column: str, values: list, params: dict | None = None):
    import requests

    body = {"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}
    if params:
        body["params"] = params
    return requests.post(url, json=body, timeout=120)


def png(width: int, height: int, rows: int | None = None) -> bytes:
    """A black 1-bit PNG declaring ``width`` x ``height``, with pixel data for ``rows`` rows (all by
    default), written row by row: a 20000x20000 image without 400 MB of memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)  # filter byte, then the bits
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def command_captions(d: Path, images: list[str], *options: str) -> list[str]:
    r = run_cli(["caption", "--model", "models/gridcap", *options, *images], cwd=d)
    assert r.returncode == 0, r.stderr
    return [line.split("\t", 1)[1] for line in r.stdout.splitlines()]


def test_served_captioner_gives_the_caption_commands_captions_and_refuses_bad_images(project):
    from vlbench.serving import encode_image_file

    images = split_images(project)
    assert all(p.endswith(".jpg") and (project / p).read_bytes()[:2] == b"\xff\xd8" for p in images)  # JPEGs
    encoded = [encode_image_file(project / p) for p in images]
    run_id = (project / "models/gridcap/run_id").read_text().strip()
    beam = command_captions(project, images, "--beam", "2")
    sampled = command_captions(project, images, "--top-p", "0.9", "--temperature", "1.5", "--seed", "7")
    assert len(set(beam + sampled)) > 1  # the images and decodings are told apart: the comparison can fail
    with served(project, f"runs:/{run_id}/model") as url:
        r = post(url, "image", encoded, {"beam": 2})
        assert r.status_code == 200, r.text
        assert [p["caption"] for p in r.json()["predictions"]] == beam
        r = post(url, "image", encoded, {"top_p": 0.9, "temperature": 1.5, "seed": 7})
        assert [p["caption"] for p in r.json()["predictions"]] == sampled

        bad = {
            "not base64": (["%%% not base64 %%%"], "not base64"),
            "not an image": ([b64(b"just some text, no picture")], "not a readable image"),
            # 26 bytes of pixel data that say 100000 x 100000: PIL's own limit trips on opening
            "decompression bomb": ([b64(png(100_000, 100_000, rows=1))], "too many pixels"),
            "20000x20000": ([b64(png(20_000, 20_000))], "too many pixels"),
            "10000x10000": ([b64(png(10_000, 10_000))], "10000x10000 pixels, more than the 50000000 allowed"),
            "empty list": ([], "no rows"),
        }
        for what, (values, reason) in bad.items():
            r = post(url, "image", values, {"beam": 2})
            assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
            message = r.json()["message"]
            assert reason in message and "\n" not in message and len(message) < 300, (what, message)
        r = post(url, "image", encoded[:1], {"beam": 2})  # still serving
        assert r.status_code == 200 and r.json()["predictions"][0]["caption"] == beam[0]


def test_served_search_gives_the_search_commands_hits(project):
    from vlbench.data.manifests import read_manifest

    query = "a red circle"
    r = run_cli(["search", query, "--model", "models/clip", "--top", "4"], cwd=project)
    assert r.returncode == 0, r.stderr
    id_of = dict(zip(*(read_manifest(str(project / "data/splits"), "test")[c] for c in ("path", "image_id"))))
    hits = [(id_of[path], float(score)) for score, path in (line.split("\t") for line in r.stdout.splitlines())]
    assert len(hits) == 4
    run_id = (project / "models/clip/run_id").read_text().strip()
    with served(project, f"runs:/{run_id}/search_model") as url:
        r = post(url, "text", [query, "a blue square"], {"top_k": 4})
        assert r.status_code == 200, r.text
        first, second = r.json()["predictions"]
        assert first["image_ids"] == [i for i, _ in hits]
        assert first["scores"] == pytest.approx([s for _, s in hits], abs=1e-4)  # the command prints 4 decimals
        assert len(second["image_ids"]) == 4 and second["scores"] == sorted(second["scores"], reverse=True)
        r = post(url, "text", [])
        assert r.status_code == 400 and r.json()["message"] == "no rows in the request"


def test_embedding_model_gives_normalised_embeddings_of_the_trained_model(project, monkeypatch):
    import mlflow
    import numpy as np
    import pandas as pd

    from vlbench.inference import Searcher, read_image
    from vlbench.serving import encode_image_file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    image = split_images(project, 1)[0]
    model = mlflow.pyfunc.load_model("models:/clip@champion")
    out = model.predict(pd.DataFrame({"text": ["a red circle", None], "image": [None, encode_image_file(project / image)]}))
    text, picture = np.array(out["text_embedding"][0]), np.array(out["image_embedding"][1])
    assert out["image_embedding"][0] is None and out["text_embedding"][1] is None
    assert np.linalg.norm(text) == pytest.approx(1, abs=1e-5) and np.linalg.norm(picture) == pytest.approx(1, abs=1e-5)
    s = Searcher.from_run(project / "models/clip")
    assert text == pytest.approx(s.embed_texts(["a red circle"])[0].numpy(), abs=1e-6)
    assert picture == pytest.approx(s.embed_images([read_image(str(project / image), s.image_size)])[0].numpy(), abs=1e-6)


def test_registered_versions_carry_dataset_and_headline_metric(project):
    client = store(project)
    for variant, metric in (("clip", "rsum"), ("gridcap", "CIDEr")):
        champ = client.get_model_version_by_alias(variant, "champion")
        expected = json.loads((project / f"metrics/{variant}.json").read_text())["metrics"][metric]
        assert champ.run_id == (project / f"models/{variant}/run_id").read_text().strip()
        assert champ.tags["dataset"] == "shapes" and champ.tags["headline_metric"] == metric
        assert float(champ.tags["headline_value"]) == pytest.approx(expected)


def test_champion_moves_only_to_a_better_model_on_the_same_dataset(project, capsys):
    from vlbench.promotion import register_and_promote

    client = store(project)
    run_id = (project / "models/clip/run_id").read_text().strip()
    champ = client.get_model_version_by_alias("clip", "champion")
    best = float(champ.tags["headline_value"])

    worse, promoted = register_and_promote(client, run_id, "clip", "alignment", {"rsum": best - 1}, "shapes")
    assert not promoted and client.get_model_version_by_alias("clip", "champion").version == champ.version
    elsewhere, promoted = register_and_promote(client, run_id, "clip", "alignment", {"rsum": best + 50}, "flickr8k")
    assert not promoted and client.get_model_version_by_alias("clip", "champion").version == champ.version
    assert "not compared" in capsys.readouterr().err
    better, promoted = register_and_promote(client, run_id, "clip", "alignment", {"rsum": best + 1}, "shapes")
    assert promoted and client.get_model_version_by_alias("clip", "champion").version == better
    assert int(champ.version) < int(worse) < int(elsewhere) < int(better)


def test_caption_and_search_commands_take_a_registered_model(project):
    image = split_images(project, 1)
    env = env_with_venv() | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}

    def vlbench(*args):
        r = subprocess.run([sys.executable, "-m", "vlbench", *args], cwd=project, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    assert vlbench("caption", "--model", "models:/gridcap@champion", "--beam", "2", *image) == \
        [f"{image[0]}\t{command_captions(project, image, '--beam', '2')[0]}"]
    assert vlbench("search", "a red circle", "--model", "models:/clip@champion", "--top", "3") == \
        vlbench("search", "a red circle", "--model", "models/clip", "--top", "3")


def test_unreachable_store_does_not_stop_evaluate_or_registration(project):
    """The run falls back to the local store (tracking.Tracker); the model is registered there."""
    before = len(store(project).search_model_versions("name = 'clip'"))
    r = evaluate(project, "clip", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stderr.splitlines() if "unreachable" in line]) == 1
    assert len(store(project).search_model_versions("name = 'clip'")) == before + 1
