import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of a 45 s hang
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = (ROOT / ".." / "shared" / "data" / "flickr8k-224").resolve()


def tiny_params(n_images: int = 48, steps: int = 4, variants: dict | None = None) -> dict:
    """A params.yaml small enough for the CPU in seconds, same shape as the real one."""
    return {
        "data": {"name": "shapes", "root": None, "shapes": {"n_images": n_images, "image_size": 64, "seed": 0}},
        "split": {"seed": 0, "val_size": 6, "test_size": 12},
        "features": {"backbones": ["efficientnet_lite0"], "image_size": 64, "batch_size": 16},
        "train": {"seed": 0, "device": "cpu"},
        "evaluate": {"batch_size": 16, "max_images": 0, "picture_images": 4},
        "tracking": {"experiment": "vlbench-test"},
        "pixel_variants": {},
        "transfer": {"datasets": {}},  # dvc.yaml loops over it, as over pixel_variants
        "variants": variants
        or {
            "clip": {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                     "optim": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1}},
            "gridcap": {"family": "captioning", "model": "grid_transformer", "image_encoder": "efficientnet_lite0",
                        "d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "heads": 4,
                        "optim": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1}},
        },
    }


def env_with_venv() -> dict:
    """Stage commands call `python`; make it this interpreter, as an activated venv would."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run_cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlbench", *args], cwd=cwd, env=env_with_venv(),
                          capture_output=True, text=True, **kw)


def copy_project(dest: Path) -> Path:
    """A copy of the project's pipeline files in a fresh folder (code is imported from the install)."""
    for name in ("dvc.yaml", "MLproject"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "metrics").mkdir()
    return dest


def prepare_features(d: Path, params: dict) -> Path:
    """A tiny project folder with data, splits and features ready for `train`."""
    import yaml

    (d / "params.yaml").write_text(yaml.safe_dump(params))
    for args in (["download", "--out", "data/raw"], ["split"],
                 ["features", "--backbone", "efficientnet_lite0", "--out", "data/features/efficientnet_lite0"]):
        r = run_cli(args, cwd=d)
        assert r.returncode == 0, r.stderr
    return d


def train_gridcap(d: Path, tag: str, fault: str | None = None, params: str = "params.yaml") -> subprocess.CompletedProcess:
    """Run the real `train` stage on variant ``gridcap`` of a prepare_features folder; outputs under
    models/, metrics/curves/ and checkpoints/ named by ``tag``. ``fault``: VLBENCH_FAULT, e.g. TERM@3."""
    env = env_with_venv()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    env.pop("VLBENCH_FAULT", None)
    if fault:
        env["VLBENCH_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "vlbench", "train", "--params", params, "--variant", "gridcap",
         "--features", "data/features/efficientnet_lite0", "--out", f"models/{tag}",
         "--curves", f"metrics/curves/{tag}.csv", "--checkpoints", f"checkpoints/{tag}"],
        cwd=d, env=env, capture_output=True, text=True)


TINY_GRID = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "heads": 4}  # a grid transformer in seconds


def assert_recalls_match_naive_reference(metrics: dict, sim: list[list[float]], owner: list[int]) -> list[list[bool]]:
    """Check the evaluate stage's i2t/t2i R@1/5/10 against a naive sort-based reference on the
    same similarities (image rows x caption columns; ``owner[j]``: the image of caption j).
    -> each image query's match flags, best first (ties go to the query, as retrieval.py documents)."""
    def best_first(pairs):  # one query's (score, is a match) per candidate -> match flags, ties in its favour
        return [hit for _, hit in sorted(pairs, key=lambda p: (-p[0], not p[1]))]

    i2t = [best_first([(s, owner[j] == i) for j, s in enumerate(row)]) for i, row in enumerate(sim)]
    t2i = [best_first([(row[j], owner[j] == i) for i, row in enumerate(sim)]) for j in range(len(owner))]
    for k in (1, 5, 10):
        assert metrics[f"i2t_R@{k}"] == pytest.approx(100 * sum(any(q[:k]) for q in i2t) / len(i2t)), k
        assert metrics[f"t2i_R@{k}"] == pytest.approx(100 * sum(any(q[:k]) for q in t2i) / len(t2i)), k
    return i2t


@pytest.fixture(scope="session")
def batch():
    """16 drawn scenes through the real EfficientNet-Lite0 weights: real features, real captions."""
    import torch

    from vlbench.data import shapes
    from vlbench.models import registry
    from vlbench.runtime import to_tensor

    enc = registry.create_image_encoder("efficientnet_lite0").eval()
    items = list(shapes.generate(16, 64, seed=3))
    x = torch.stack([to_tensor(img, enc.mean, enc.std) for _, img, _ in items])
    with torch.no_grad():
        grid = enc(x)
    return grid, [caps[0] for _, _, caps in items]


@pytest.fixture(scope="session")
def trained_grid_captioner(batch):
    """A tiny grid transformer trained 30 steps on ``batch``: decoding tests need a peaked model."""
    import torch

    from vlbench.models.tokenizers import Vocabulary
    from vlbench.models.variants import build_variant, create_variant_model

    torch.manual_seed(0)
    grid, captions = batch
    cfg = build_variant("t", {"family": "captioning", "model": "grid_transformer", "image_encoder": "efficientnet_lite0",
                              **TINY_GRID})
    model = create_variant_model(cfg, grid.shape[2], grid.shape[1], Vocabulary.build(captions).itos)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model.loss(grid, captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), grid
