"""Inputs checked against the config (issue #12, item 5): cached features of another image encoder
or image size, a `train.device` this machine does not have, and the CPU thread count of jobs that
share the cores. Each mismatch stops the stage with one line naming the key, exit status 2, before
anything is written."""
import json
import os
import shutil
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import env_with_venv, prepare_features, run_cli, tiny_params, train_gridcap

FEATURES = "data/features/efficientnet_lite0"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with real features (Lite0 at 64 px) and one trained captioner (models/good)."""
    d = prepare_features(tmp_path_factory.mktemp("inputs_checks"), tiny_params(steps=2))
    r = train_gridcap(d, "good")
    assert r.returncode == 0, r.stderr
    return d


def features_copy(project: Path, name: str, edit) -> str:
    """A copy of the real features folder with its meta.json edited by ``edit(meta)``."""
    dest = project / "data" / "features" / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(project / FEATURES, dest)
    meta = json.loads((dest / "meta.json").read_text())
    edit(meta)
    (dest / "meta.json").write_text(json.dumps(meta))
    return f"data/features/{name}"


def run_stage(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    return subprocess.run([sys.executable, "-m", "vlbench", *args], cwd=project, env=env, capture_output=True, text=True)


def train_into(project: Path, tag: str, features: str, params: str = "params.yaml") -> subprocess.CompletedProcess:
    return run_stage(project, "train", "--params", params, "--variant", "gridcap", "--features", features,
                     "--out", f"models/{tag}", "--curves", f"metrics/curves/{tag}.csv", "--checkpoints", f"checkpoints/{tag}")


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def assert_nothing_written(project: Path, tag: str) -> None:
    assert not (project / "models" / tag).exists()
    assert not (project / "metrics" / "curves" / f"{tag}.csv").exists()
    assert not (project / "checkpoints" / tag).exists()


def test_features_meta_records_backbone_and_image_size(project):
    meta = json.loads((project / FEATURES / "meta.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["image_size"] == 64


def test_train_stops_on_features_of_another_backbone(project):
    features = features_copy(project, "resnet", lambda m: m.update(backbone="timm/resnet50"))
    line = one_line(train_into(project, "bad_backbone", features))
    assert line.startswith("vlbench train: bad params: variants.gridcap.image_encoder: efficientnet_lite0 but "
                           f"{features} holds features of timm/resnet50"), line
    assert_nothing_written(project, "bad_backbone")


def test_train_stops_on_features_of_another_image_size(project):
    params = tiny_params(steps=2)
    params["features"]["image_size"] = 96
    (project / "params_96.yaml").write_text(yaml.safe_dump(params))
    line = one_line(train_into(project, "bad_size", FEATURES, "params_96.yaml"))
    assert line.startswith(f"vlbench train: bad params: features.image_size: 96 but {FEATURES} holds features of "
                           "images resized to 64"), line
    assert_nothing_written(project, "bad_size")


def test_train_stops_on_features_made_before_meta_recorded_the_backbone(project):
    features = features_copy(project, "old", lambda m: m.pop("backbone"))
    line = one_line(train_into(project, "old_features", features))
    assert line.startswith("vlbench train: bad params: variants.gridcap.image_encoder: "), line
    assert "older version" in line and "features stage" in line, line
    assert_nothing_written(project, "old_features")


def test_evaluate_stops_on_features_of_another_backbone(project):
    features = features_copy(project, "resnet_eval", lambda m: m.update(backbone="timm/resnet50"))
    r = run_stage(project, "evaluate", "--variant", "gridcap", "--model", "models/good", "--features", features,
                  "--metrics", "metrics_bad")
    line = one_line(r)
    assert line.startswith("vlbench evaluate: bad params: variants.gridcap.image_encoder: efficientnet_lite0 but "
                           f"{features} holds features of timm/resnet50"), line
    assert not (project / "metrics_bad").exists()


def test_evaluate_stops_on_features_of_another_image_size(project):
    features = features_copy(project, "size_eval", lambda m: m.update(image_size=96))
    r = run_stage(project, "evaluate", "--variant", "gridcap", "--model", "models/good", "--features", features,
                  "--metrics", "metrics_bad_size")
    line = one_line(r)
    assert line.startswith(f"vlbench evaluate: bad params: features.image_size: 64 but {features} holds"), line
    assert not (project / "metrics_bad_size").exists()


MISSING_DEVICES = [
    pytest.param("cuda:7", marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has cuda:7")),
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    pytest.param("mps", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available")),
]


@pytest.mark.parametrize("device", MISSING_DEVICES)
def test_check_names_a_missing_train_device(tmp_path, device):
    params = tiny_params()
    params["train"]["device"] = device
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    line = one_line(run_cli(["check"], cwd=tmp_path))
    assert line.startswith(f"vlbench check: bad params: train.device: {device!r} is not available"), line
    assert "available: cpu" in line, line


def test_train_stops_on_a_missing_device_before_any_work(project):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has cuda:7")
    params = tiny_params(steps=2)
    params["train"]["device"] = "cuda:7"
    (project / "params_cuda7.yaml").write_text(yaml.safe_dump(params))
    line = one_line(train_into(project, "cuda7", FEATURES, "params_cuda7.yaml"))
    assert line.startswith("vlbench train: bad params: train.device: 'cuda:7' is not available"), line
    assert_nothing_written(project, "cuda7")


def test_auto_and_cpu_devices_pass_validation():
    from vlbench.validation import validate_all

    for device in ("auto", "cpu"):
        params = tiny_params()
        params["train"]["device"] = device
        validate_all(params)


# ------------------------------------------------------------------------------ threads

PROBE = """
import json, os, sys
if {cpus!r} is not None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:{cpus!r}]))
import torch
from vlbench.runtime import configure_threads
try:
    got = configure_threads({threads})
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "message": str(e)}}))
    sys.exit(0)
print(json.dumps({{"returned": got, "torch": torch.get_num_threads()}}))
"""


def probe(env_vars: dict, threads: int = 0, cpus: int | None = None) -> dict:
    """configure_threads(threads) in a fresh interpreter with exactly these thread variables."""
    env = env_with_venv()
    for k in ("VLBENCH_JOBS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(k, None)
    env.update(env_vars)
    r = subprocess.run([sys.executable, "-c", PROBE.format(threads=threads, cpus=cpus)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def usable():
    """min(usable cores, torch's default thread count) of a fresh process: what auto divides."""
    env = env_with_venv()
    for k in ("VLBENCH_JOBS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                       capture_output=True, text=True, check=True)
    return min(len(os.sched_getaffinity(0)), int(r.stdout))


def test_threads_default_one_job(usable):
    assert probe({}) == {"returned": usable, "torch": usable}
    assert probe({"VLBENCH_JOBS": "1"}) == {"returned": usable, "torch": usable}


@pytest.mark.parametrize("jobs", [2, 3, 64])
def test_threads_split_between_jobs(usable, jobs):
    expected = max(1, usable // jobs)
    assert probe({"VLBENCH_JOBS": str(jobs)}) == {"returned": expected, "torch": expected}


def test_threads_follow_the_cores_this_process_may_use():
    assert probe({}, cpus=1) == {"returned": 1, "torch": 1}
    assert probe({"VLBENCH_JOBS": "2"}, cpus=1) == {"returned": 1, "torch": 1}


def test_threads_param_wins_over_jobs():
    assert probe({"VLBENCH_JOBS": "2"}, threads=3) == {"returned": 3, "torch": 3}


def test_omp_num_threads_of_the_user_wins():
    assert probe({"OMP_NUM_THREADS": "1", "VLBENCH_JOBS": "2"}, threads=3) == {"returned": 1, "torch": 1}
    assert probe({"OMP_NUM_THREADS": "1"}, threads=2) == {"returned": 1, "torch": 1}


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_bad_vlbench_jobs_is_one_line(value):
    out = probe({"VLBENCH_JOBS": value})
    assert out["error"] == "ParamError" and out["message"].startswith("VLBENCH_JOBS: "), out


MALLOC_PROBE = """
import ctypes, json, resource
import torch
from vlbench.runtime import configure_threads
configure_threads()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 48 * 2**20  # a step's large tensor: above glibc's largest adaptive mmap threshold (32 MB)
faults = []
for _ in range(6):  # allocated, written, freed, again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_memory_is_reused_not_faulted_in_again():
    """configure_threads (every stage) makes glibc keep freed blocks: a 48 MB block allocated
    again costs no fresh page faults (12,288 of 4 KB under glibc's default, at every allocation),
    unless VLBENCH_MALLOC=default asks for glibc's own behaviour. (Plain malloc: what torch's own
    allocator does on top is benchmarks/malloc_reuse.py's to show.)"""
    def faults(env_vars: dict) -> list[int]:
        env = env_with_venv()
        env.pop("VLBENCH_MALLOC", None)
        env.update(env_vars)
        r = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    pages = 48 * 2**20 // resource.getpagesize()
    default, reuse = faults({"VLBENCH_MALLOC": "default"}), faults({})
    assert all(f > pages // 2 for f in default)  # every allocation maps fresh pages
    assert reuse[0] > pages // 2 and all(f < pages // 20 for f in reuse[1:])  # the first grows the heap; then none
