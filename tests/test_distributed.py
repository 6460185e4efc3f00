"""`python -m vlbench train` under torchrun: 2 CPU processes (gloo), even stopped and resumed, train
like 1 process with the same global batch, and only rank 0 writes (one MLflow run, one model folder)."""
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import env_with_venv, prepare_features, tiny_params

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")

TRAIN = ["-m", "vlbench", "train", "--variant", "clip", "--features", "data/features/efficientnet_lite0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(d, args: list[str], nproc: int, tag: str, **extra_env) -> subprocess.CompletedProcess:
    """``nproc`` > 1: through torchrun (torch.distributed.run), as a user would on N GPUs."""
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / f'mlflow-{tag}.db'}"
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets for its workers: the same arithmetic in both runs
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VLBENCH_FAULT"):
        env.pop(var, None)
    env.update(extra_env)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.run([sys.executable, *(launcher if nproc > 1 else []), *args], cwd=d, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = tiny_params(n_images=40, steps=6)
    params["variants"]["clip"]["dropout"] = 0.0  # each rank draws its own dropout masks: no longer one run's
    params["train"]["checkpoint_every"] = 3
    return prepare_features(tmp_path_factory.mktemp("ddp"), params)


@pytest.fixture(scope="module")
def runs(project):
    """One process straight through; two processes stopped by SIGTERM after step 4, then resumed."""
    out = {}
    for nproc in (1, 2):
        tag = f"p{nproc}"
        args = [*TRAIN, "--out", f"models/{tag}", "--curves", f"metrics/{tag}.csv", "--checkpoints", f"checkpoints/{tag}"]
        if nproc == 2:
            r = launch(project, args, nproc, tag, VLBENCH_FAULT="TERM@4")
            assert r.returncode != 0 and "stopped by signal 15 after step 4" in r.stderr, r.stdout + r.stderr
            assert (project / f"checkpoints/{tag}/last.pt").is_file()
            assert not (project / f"models/{tag}/model.safetensors").exists()
        r = launch(project, args, nproc, tag)
        assert r.returncode == 0, r.stdout + r.stderr
        out[nproc] = r
    assert "resuming clip from step 4/6" in out[2].stderr
    return out


def read_curve(path):
    import pandas as pd

    return pd.read_csv(path)


def test_two_processes_train_like_one(project, runs):
    one, two = read_curve(project / "metrics/p1.csv"), read_curve(project / "metrics/p2.csv")
    assert list(two["step"]) == list(one["step"]) == list(range(6))
    assert two["loss"].tolist() == pytest.approx(one["loss"].tolist(), rel=1e-4)
    assert one["loss"].iloc[-1] < one["loss"].iloc[0]  # it did train
    w1, w2 = load_file(str(project / "models/p1/model.safetensors")), load_file(str(project / "models/p2/model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_only_rank_zero_writes(project, runs):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow-p2.db'}")
    exp = client.get_experiment_by_name("vlbench-test")
    (run,) = client.search_runs([exp.experiment_id])  # one run, not one per process
    assert run.info.run_id == (project / "models/p2/run_id").read_text().strip()
    assert run.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(6))
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2  # steps 3 and 6, logged once each
    assert run.info.status == "FINISHED"
    assert sorted(p.name for p in (project / "models/p2").iterdir()) == ["config.json", "model.safetensors", "run_id"]
    assert runs[2].stdout.count("clip: 6 steps") == 1  # the summary line: rank 0 only
    assert not (project / "checkpoints/p2/last.pt").exists()


def test_refuses_a_global_batch_that_does_not_split(project):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"]["clip"]["optim"]["batch_size"] = 7
    (project / "odd.yaml").write_text(yaml.safe_dump(params))
    # rank 0 of 2 as torchrun would start it: it must refuse before joining the (absent) others
    r = launch(project, [*TRAIN, "--params", "odd.yaml", "--out", "models/odd"], 1, "odd", RANK="0", WORLD_SIZE="2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("vlbench train: bad params: variants.clip.optim.batch_size: 7 does not "
                                                 "split into 2 process(es) x train.grad_accum_steps=1")
    assert not (project / "models/odd/model.safetensors").exists()


GRADIENTS = textwrap.dedent("""
    # Run under torchrun: DDP + gathered contrastive loss on each rank's half of a batch must give
    # the gradients of the one-process loss over the whole batch.
    import sys
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from vlbench import distributed
    from vlbench.models.variants import build_variant, create_variant_model

    ranks = distributed.from_env()
    distributed.setup(ranks, torch.device("cpu"))
    cfg = build_variant("clip", {"family": "alignment", "model": "dual_encoder",
                                 "image_encoder": "efficientnet_lite0", "dropout": 0.0})
    torch.manual_seed(0)
    model = create_variant_model(cfg, image_dim=32, n_grid=4)
    images, texts = torch.randn(8, 4, 32), torch.randn(8, model.text_head.proj.in_features)
    reference = create_variant_model(cfg, image_dim=32, n_grid=4)
    reference.load_state_dict(model.state_dict())

    ddp = DistributedDataParallel(model)
    ddp(ranks.share(images), ranks.share(texts)).backward()
    reference.loss(images, texts).backward()  # one process, the whole batch, nothing gathered
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    want = {k: p.grad for k, p in reference.named_parameters() if p.requires_grad}
    if ranks.is_main:
        torch.save({"ddp": grads, "one": want}, sys.argv[1])
    distributed.teardown()
""")


def test_gradients_match_one_process(tmp_path):
    (tmp_path / "grads.py").write_text(GRADIENTS)
    r = launch(tmp_path, ["grads.py", str(tmp_path / "grads.pt")], 2, "grads")
    assert r.returncode == 0, r.stdout + r.stderr
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert got["ddp"].keys() == got["one"].keys() and "logit_scale" in got["ddp"]
    for k, want in got["one"].items():
        assert want.abs().sum() > 0, k
        torch.testing.assert_close(got["ddp"][k], want, rtol=1e-4, atol=1e-6, msg=k)
