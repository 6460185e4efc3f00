"""MLflow for real: a tracking server on 127.0.0.1, and a store that cannot be reached."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import env_with_venv, prepare_features, tiny_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_features(tmp_path_factory.mktemp("tracked"), tiny_params(n_images=30, steps=3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art"),
         "--workers", "1"],
        env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def train(d: Path, variant: str, uri: str) -> subprocess.CompletedProcess:
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(
        [sys.executable, "-m", "vlbench", "train", "--variant", variant, "--features", "data/features/efficientnet_lite0"],
        cwd=d, env=env, capture_output=True, text=True,
    )


def test_train_and_evaluate_log_to_a_tracking_server(prepared, server):
    import mlflow

    r = train(prepared, "clip", server)
    assert r.returncode == 0, r.stderr
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = server
    r = subprocess.run([sys.executable, "-m", "vlbench", "evaluate", "--variant", "clip", "--features",
                        "data/features/efficientnet_lite0"], cwd=prepared, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    client = mlflow.MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("vlbench-test")
    runs = client.search_runs([exp.experiment_id])
    assert [x.info.run_name for x in runs] == ["clip"]
    run = runs[0]
    assert run.info.run_id == (prepared / "models/clip/run_id").read_text().strip()
    assert run.data.params["text_encoder"] == "minilm_l6"
    assert "test_t2i_R_at_5" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    assert {a.path for a in client.list_artifacts(run.info.run_id, "pictures")} == {"pictures/clip.png"}


def test_unreachable_store_falls_back_to_local_sqlite(prepared):
    import mlflow

    r = train(prepared, "gridcap", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "unreachable" in line]
    assert len(warnings) == 1 and "mlflow.db" in warnings[0]
    assert (prepared / "models/gridcap/model.safetensors").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{prepared / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlbench-test")
    assert "gridcap" in [x.info.run_name for x in client.search_runs([exp.experiment_id])]


def test_server_stopped_mid_run_loses_nothing(prepared, tmp_path):
    """The store dies while training: one message, the run moves to the local store with its
    whole history replayed, and training finishes."""
    import json
    import urllib.request

    import mlflow

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"],
        env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        import yaml

        params = yaml.safe_load((prepared / "params.yaml").read_text())
        params["variants"]["gridcap"]["optim"].update(steps=500, log_every=1)  # long enough to outlive the server
        (prepared / "long.yaml").write_text(yaml.safe_dump(params))
        env = env_with_venv()
        env["MLFLOW_TRACKING_URI"] = url
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlbench", "train", "--params", "long.yaml", "--variant", "gridcap",
             "--features", "data/features/efficientnet_lite0", "--out", "models/long", "--checkpoints", "checkpoints/long"],
            cwd=prepared, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # wait until the run is on the server with some steps logged, then stop the server
        deadline = time.time() + 120
        while time.time() < deadline:
            run_file = prepared / "models/long/run_id"
            if run_file.is_file():
                q = f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run_file.read_text()}&metric_key=train_loss"
                try:
                    if len(json.load(urllib.request.urlopen(q, timeout=2)).get("metrics", [])) >= 20:
                        break
                except OSError:
                    pass
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached the server")
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert len([line for line in err.splitlines() if "unreachable" in line]) == 1, err
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{prepared / 'mlflow.db'}")
    run = client.get_run((prepared / "models/long/run_id").read_text())
    assert run.info.status == "FINISHED" and run.data.params["optim.steps"] == "500"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train_loss")})
    assert steps == list(range(500))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/model.safetensors"}
