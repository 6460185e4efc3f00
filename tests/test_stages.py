"""Each stage's outputs, on a tiny generated set and on the real Flickr8k copy when present."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import FLICKR8K, run_cli, tiny_params
from vlbench.errors import ParamError
from vlbench.data import shapes


def test_shapes_are_deterministic_and_described():
    a = list(shapes.generate(5, 64, seed=1))
    b = list(shapes.generate(5, 64, seed=1))
    c = list(shapes.generate(5, 64, seed=2))
    assert [x[2] for x in a] == [x[2] for x in b]
    assert all(np.array_equal(np.asarray(x[1]), np.asarray(y[1])) for x, y in zip(a, b))
    assert [x[2] for x in a] != [x[2] for x in c]
    for _, img, caps in a:
        assert img.size == (64, 64) and len(caps) == 5 and len(set(caps)) == 5
        assert any(colour in caps[0] for colour in shapes.COLOURS)


def test_download_split_features(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(n_images=40)))
    r = run_cli(["download", "--out", "data/raw"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ann = json.loads((tmp_path / "data/raw/annotations.json").read_text())
    assert len(ann) == 40 and all(len(a["captions"]) == 5 for a in ann)
    assert json.loads((tmp_path / "data/raw/report.json").read_text())["broken_images"] == 0
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith(".tmp")]

    r = run_cli(["split", "--raw", "data/raw", "--out", "data/splits"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    parts = {s: pd.read_parquet(tmp_path / f"data/splits/{s}.parquet") for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [22, 6, 12]
    ids = [set(p["image_id"]) for p in parts.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(parts["test"]["captions"].iloc[0]) == 5

    r = run_cli(["features", "--backbone", "efficientnet_lite0", "--out", "data/features/efficientnet_lite0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    feats = np.load(tmp_path / "data/features/efficientnet_lite0/test.npy", mmap_mode="r")
    ids = json.loads((tmp_path / "data/features/efficientnet_lite0/test_ids.json").read_text())
    assert feats.dtype == np.float16 and feats.shape == (12, 4, 1280)  # 64 px -> 2x2 grid
    assert ids == list(parts["test"]["image_id"])
    assert np.isfinite(feats.astype(np.float32)).all() and feats.astype(np.float32).std() > 0


def test_broken_image_is_dropped_and_counted(tmp_path):
    """A truncated file in the generated set is skipped and reported, never a crash later."""
    from vlbench.stages.download import verify_images

    good = tmp_path / "good.jpg"
    Image.new("RGB", (8, 8), "red").save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:40])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    records = [{"path": p.name} for p in (good, bad, empty)] * 20 + [{"path": good.name}] * 200
    kept, counts = verify_images(records, tmp_path, max_broken_fraction=0.5)
    assert counts["broken_images"] == 40 and counts["missing_images"] == 0 and len(kept) == 220
    with pytest.raises(ParamError, match="^data.max_broken_fraction: 40 of 260 images are missing or broken"):
        verify_images(records, tmp_path, max_broken_fraction=0.1)


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"real Flickr8k copy not found at {FLICKR8K}")
def test_flickr8k_original_layout(tmp_path):
    params = tiny_params()
    params["data"] = {"name": "flickr8k", "root": str(FLICKR8K)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = run_cli(["download", "--out", "data/raw"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "data/raw/report.json").read_text())
    assert report["images"] == 8000 and report["captions"] == 40000 and report["broken_images"] == 0
    assert report["layout"] == "flickr8k" and report["split_source"] == "flickr8k_split_files"
    assert report["captions_per_image"] == {"5": 8000} and report["missing_images"] == 0
    r = run_cli(["split", "--raw", "data/raw", "--out", "data/splits"], cwd=tmp_path)
    counts = json.loads((tmp_path / "data/splits/counts.json").read_text())
    assert counts == {"train": 6000, "val": 1000, "test": 1000}
    test = pd.read_parquet(tmp_path / "data/splits/test.parquet")
    assert all(len(c) == 5 for c in test["captions"])


def test_disk_full_gives_a_clear_error_and_no_partial_output(tmp_path):
    """A real full disk: a 1 MiB tmpfs (needs root to mount; skipped otherwise)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        params = tiny_params(n_images=400)
        params["data"]["shapes"]["image_size"] = 128  # ~4 KB a JPEG: 400 of them do not fit in 1 MiB
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        r = run_cli(["download", "--out", str(mnt / "raw")], cwd=tmp_path)
        assert r.returncode == 1
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("vlbench download: disk full") and "nothing was written" in last
        assert list(mnt.iterdir()) == []  # no half-written folder, no temp files
    finally:
        subprocess.run(["umount", str(mnt)])
