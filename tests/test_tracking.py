"""MLflow for real: a tracking server on 127.0.0.1, and a store that cannot be reached."""
import json
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
    trained = mlflow.MlflowClient(tracking_uri=server).get_run((prepared / "models/clip/run_id").read_text().strip())
    assert trained.info.status == "FINISHED" and trained.info.end_time  # ended by train, before evaluate
    assert "vlbench.pid" in trained.data.tags
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
    # the served models went through the server's artifact store, and the registry is the server's
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "search_model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "search_model")}
    assert client.get_model_version_by_alias("clip", "champion").run_id == run.info.run_id


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


def test_evaluating_into_another_store_leaves_the_train_stages_run_id_alone(prepared, tmp_path):
    """models/<v>/run_id is a DVC output of the train stage: an evaluation logged to a store that
    lacks the training run gets a run there, and the file keeps the training run's id."""
    import mlflow

    r = train(prepared, "clip", f"sqlite:///{prepared / 'mlflow.db'}")
    assert r.returncode == 0, r.stderr
    run_id_file = prepared / "models/clip/run_id"
    trained = run_id_file.read_bytes()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = other
    r = subprocess.run([sys.executable, "-m", "vlbench", "evaluate", "--variant", "clip", "--features",
                        "data/features/efficientnet_lite0"], cwd=prepared, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert run_id_file.read_bytes() == trained
    client = mlflow.MlflowClient(tracking_uri=other)
    runs = client.search_runs([client.get_experiment_by_name("vlbench-test").experiment_id])
    assert [x.info.run_name for x in runs] == ["clip"] and "test_t2i_R_at_1" in runs[0].data.metrics
    said = [line for line in r.stderr.splitlines() if "keeps the training run" in line]
    assert len(said) == 1 and runs[0].info.run_id in said[0] and trained.decode().strip() in said[0]


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


# -- lineage, stale runs, durations (issue #15, item 3): the Tracker in this process, a real sqlite store

@pytest.fixture
def store(tmp_path, monkeypatch):
    """A git repo with one commit as the working directory, a sqlite store in it, no DVC around."""
    import mlflow

    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def test_run_records_commit_dvc_inputs_system_metrics_and_experiment_kind(store, tmp_path, monkeypatch):
    from vlbench.tracking import Tracker

    (tmp_path / "data/splits").mkdir(parents=True)
    (tmp_path / "data/splits/train.parquet").write_bytes(b"x" * 10)
    (tmp_path / "data/splits/val.parquet").write_bytes(b"y" * 5)
    (tmp_path / "data/features/enc").mkdir(parents=True)
    (tmp_path / "data/features/enc/train.npy").write_bytes(b"z" * 7)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  split:\n    cmd: s\n    outs:\n    - path: data/splits\n      hash: md5\n"
        "      md5: 11111111111111111111111111111111.dir\n      size: 15\n      nfiles: 2\n"
        "  features@enc:\n    cmd: f\n    outs:\n    - path: data/features/enc\n      hash: md5\n"
        "      md5: 22222222222222222222222222222222.dir\n      size: 8\n      nfiles: 1\n")  # not 7: stale
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/m.json").write_text("{}")  # a pipeline output: does not make the tree dirty
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with Tracker("lineage", "v", tmp_path / "models/v/run_id", resume=False,
                 inputs=["data/splits", str(tmp_path / "data/features/enc"), "data/raw"]) as t:
        time.sleep(1.0)
    run = store.get_run(t.run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["git_dirty"] == "false"
    # the splits' DVC hash is the dataset's digest; features whose size no longer matches dvc.lock,
    # and data/raw (not in dvc.lock), are left out
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("data/splits", "11111111111111111111111111111111.dir")]
    assert [(tag.key, tag.value) for tag in inputs[0].tags] == [("mlflow.data.context", "training")]
    assert json.loads(inputs[0].dataset.profile) == {"size": 15, "nfiles": 2}
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert store.get_experiment_by_name("lineage").tags["mlflow.experimentKind"] == "custom_model_development"

    (tmp_path / "params.yaml").write_text("a: 2\n")  # an uncommitted change to a tracked file
    with Tracker("lineage", "v", tmp_path / "models/v/run_id", resume=False) as t:
        pass
    assert store.get_run(t.run_id).data.tags["git_dirty"] == "true"


def test_a_run_whose_process_died_is_marked_killed_by_the_next_run(store, tmp_path):
    from vlbench.tracking import Tracker

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom vlbench.tracking import Tracker\n"
         "t = Tracker('stale', 'v', 'models/v/run_id', resume=False).__enter__()\n"
         "print(t.run_id, flush=True)\ntime.sleep(600)\n"],
        cwd=tmp_path, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        stale = child.stdout.readline().strip()
        assert stale, "the child never opened its run"
        with Tracker("stale", "v", tmp_path / "other/run_id", resume=False):
            pass
        assert store.get_run(stale).info.status == "RUNNING"  # its process is alive: left alone
    finally:
        child.kill()  # SIGKILL: nothing ends the run
        child.wait(timeout=20)
    with Tracker("stale", "v", tmp_path / "other/run_id", resume=False) as t:
        pass
    run = store.get_run(stale)
    assert run.info.status == "KILLED" and run.info.end_time >= run.info.start_time
    assert store.get_run(t.run_id).info.status == "FINISHED"


def test_reopened_run_counts_its_work_not_the_wait_between(store, tmp_path):
    """train ends its run; other variants train; evaluate reopens it: the run's duration is its
    training plus its evaluation."""
    from vlbench.tracking import Tracker

    with Tracker("durations", "v", tmp_path / "models/v/run_id", resume=False) as t:
        time.sleep(0.6)
    run = store.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time - run.info.start_time >= 600
    time.sleep(1.5)  # other variants' stages
    started = time.time()
    time.sleep(0.4)  # the evaluation before the tracker opens
    with Tracker("durations", "v", tmp_path / "models/v/run_id", resume=True, context="evaluation",
                 started_at=started) as again:
        pass
    span = time.time() * 1000 - run.info.start_time
    run = store.get_run(t.run_id)
    assert again.run_id == t.run_id and run.info.status == "FINISHED"
    duration = run.info.end_time - run.info.start_time
    assert 1000 <= duration <= span - 1000, (duration, span)


# -- a shared server that lets nobody in without a password (issue #15, item 6)

def test_basic_auth_server_refuses_strangers_and_takes_a_users_runs(tmp_path, monkeypatch, capsys):
    import requests

    import mlflow

    from vlbench.tracking import Tracker

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = EDIT\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = env_with_venv() | {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
                             "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret-1",
                             "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "art"), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(url + "/health", timeout=10).ok:
                    break
            except requests.RequestException:  # not listening yet, or still starting
                time.sleep(0.5)
            assert proc.poll() is None, proc.stderr.read()
        else:
            pytest.fail("mlflow server did not start")
        search = url + "/api/2.0/mlflow/experiments/search?max_results=10"
        assert requests.get(search, timeout=60).status_code == 401
        assert requests.get(search, auth=("admin", "wrong"), timeout=60).status_code == 401
        for user in ("alice", "bob"):
            r = requests.post(url + "/api/2.0/mlflow/users/create", json={"username": user, "password": f"{user}-password-1"},
                              auth=("admin", "admin-secret-1"), timeout=60)
            assert r.ok, r.text
        assert requests.get(search, auth=("alice", "alice-password-1"), timeout=60).status_code == 200

        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_RUN_ID"):
            monkeypatch.delenv(var, raising=False)
        runs = {}
        for user in ("alice", "bob"):  # alice creates the experiment, bob logs to it too
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", f"{user}-password-1")
            with Tracker("team", f"v_{user}", tmp_path / user / "run_id", resume=False) as t:
                t.log_metrics({"loss": 0.5}, step=1)
            runs[user] = t.run_id
        assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to the local store
        client = mlflow.MlflowClient(tracking_uri=url)
        for user, run_id in runs.items():
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5

        capsys.readouterr()
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-bobs-password")  # refused: training goes on locally
        with Tracker("team", "v_wrong", tmp_path / "wrong" / "run_id", resume=False) as t:
            t.log_metrics({"loss": 0.25}, step=1)
        assert "401" in capsys.readouterr().err and (tmp_path / "mlflow.db").is_file()
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
