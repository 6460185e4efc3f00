"""Evaluation on another dataset (stage `transfer`): variants trained on a Flickr8k-layout copy,
scored on a COCO-layout copy (both built here from drawn scenes, real JPEG files), through the real
CLI stages and a real sqlite MLflow store."""
import json
import shutil

import pandas as pd
import pytest
import yaml

from conftest import assert_recalls_match_naive_reference, run_cli, tiny_params
from vlbench.data import shapes


def flickr8k_copy(root, n: int, seed: int):
    """Flickr8k's original release layout: Flicker8k_Dataset/ + Flickr8k_text/ (token file, split files)."""
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k_text").mkdir()
    names, lines = [], []
    for i, (fname, img, caps) in enumerate(shapes.generate(n, 64, seed)):
        name = f"{1000 + i}_f8k.jpg"
        img.save(root / "Flicker8k_Dataset" / name, quality=92)
        names.append(name)
        lines += [f"{name}#{k}\t{c}" for k, c in enumerate(caps)]
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    n_test, n_val = 10, 6
    for fname, part in (("testImages", names[:n_test]), ("devImages", names[n_test:n_test + n_val]),
                        ("trainImages", names[n_test + n_val:])):
        (root / "Flickr8k_text" / f"Flickr_8k.{fname}.txt").write_text("\n".join(part) + "\n")


def coco_copy(root, n: int, seed: int, karpathy_test: int | None = 8):
    """COCO 2014: train2014/ val2014/ + annotations/captions_<split>2014.json, and Karpathy's
    dataset_coco.json (its first ``karpathy_test`` val images are test; None: no Karpathy file)."""
    (root / "annotations").mkdir(parents=True)
    scenes = list(shapes.generate(n, 64, seed))
    half = n // 2
    karpathy = []
    for split, part in (("train", range(0, half)), ("val", range(half, n))):
        (root / f"{split}2014").mkdir()
        images, anns = [], []
        for i in part:
            cocoid, fname = 100 + i, f"COCO_{split}2014_{100 + i:012d}.jpg"
            scenes[i][1].save(root / f"{split}2014" / fname, quality=92)
            images.append({"id": cocoid, "file_name": fname})
            anns += [{"id": cocoid * 10 + k, "image_id": cocoid, "caption": c} for k, c in enumerate(scenes[i][2])]
            test = split == "val" and karpathy_test is not None and i - half < karpathy_test
            karpathy.append({"cocoid": cocoid, "split": "test" if test else split})
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    if karpathy_test is not None:
        (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Trained on the Flickr8k-layout copy, evaluated in-domain, scored on the COCO-layout copy, reported."""
    d = tmp_path_factory.mktemp("transfer")
    flickr8k_copy(d / "f8k", 40, seed=0)
    coco_copy(d / "cocoish", 16, seed=7)
    params = tiny_params(steps=6)
    params["data"] = {"name": "flickr8k", "root": str(d / "f8k")}
    params["transfer"] = {"datasets": {"cocoish": {"name": "coco", "root": str(d / "cocoish")}}}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    steps = [["download"], ["split"], ["features", "--backbone", "efficientnet_lite0", "--out", "data/features/efficientnet_lite0"]]
    for v in params["variants"]:
        steps += [["train", "--variant", v, "--features", "data/features/efficientnet_lite0"],
                  ["evaluate", "--variant", v, "--features", "data/features/efficientnet_lite0"]]
    steps += [["transfer", "--dataset", "cocoish"], ["report"]]
    for args in steps:
        r = run_cli(args, cwd=d)
        assert r.returncode == 0, (args, r.stderr[-3000:])
    return d


def test_transfer_metrics_have_the_in_domain_names_and_baselines(project):
    d = project
    report = json.loads((d / "data/transfer/cocoish/report.json").read_text())
    assert report["layout"] == "coco2014" and report["split_source"] == "karpathy" and report["test_images"] == 8
    for v in ("clip", "gridcap"):
        own = json.loads((d / f"metrics/{v}.json").read_text())
        other = json.loads((d / f"metrics/transfer/cocoish/{v}.json").read_text())
        assert set(other["metrics"]) == set(own["metrics"]) and other["metrics"] != own["metrics"]
        assert other["images"] == 8 and other["captions"] == 40 and own["images"] == 10
        baselines = {"chance", "random_projection"} if own["family"] == "alignment" else {"chance", "nearest_neighbour"}
        for b in baselines:
            assert set(other[b]) == set(own[b]), b
        assert other["transfer"]["dataset"] == "coco" and (d / f"metrics/transfer/cocoish/pictures/{v}.png").is_file()
    test_ids = set(pd.read_parquet(d / "data/transfer/cocoish/test.parquet")["image_id"])
    assert test_ids == {f"COCO_val2014_{100 + i:012d}.jpg" for i in range(8, 16)}


def test_transfer_recalls_match_the_model_run_directly(project):
    """The recalls again, from the test images' pixels through the variant's own image encoder
    (not the transfer stage's encoding code) and the saved model, by a naive sort-based reference."""
    import numpy as np
    import torch

    from vlbench.models.registry import create_image_encoder
    from vlbench.models.trained import load_trained
    from vlbench.runtime import load_image, to_tensor

    d = project
    result = json.loads((d / "metrics/transfer/cocoish/clip.json").read_text())
    model, cfg, meta = load_trained(d / "models/clip")
    test = pd.read_parquet(d / "data/transfer/cocoish/test.parquet")
    enc = create_image_encoder(cfg.image_encoder).eval()
    pixels = torch.stack([to_tensor(load_image(p, meta["image_size"]), enc.mean, enc.std) for p in test["path"]])
    flat = [c for caps in test["captions"] for c in caps]
    owner = [i for i, caps in enumerate(test["captions"]) for _ in caps]
    with torch.no_grad():
        grid = torch.from_numpy(enc(pixels).numpy().astype(np.float16))  # cached as float16, like the features stage
        image = model.embed_images(model.image_tokens(grid))
        sim = (image @ model.embed_text_features(model.text_features(flat, "cpu")).T).tolist()
    assert_recalls_match_naive_reference(result["metrics"], sim, owner)
    assert result["metrics"]["rsum"] == pytest.approx(sum(v for k, v in result["metrics"].items() if "_R@" in k))


def test_captioning_baselines_come_from_the_in_domain_training_split(project):
    d = project
    first_caps = {caps[0] for caps in pd.read_parquet(d / "data/splits/train.parquet")["captions"]}
    coco_caps = {c for caps in pd.read_parquet(d / "data/transfer/cocoish/test.parquet")["captions"] for c in caps}
    generated = json.loads((d / "metrics/transfer/cocoish/gridcap_captions.json").read_text())
    assert len(generated) == 8
    for g in generated:
        assert g["nearest_neighbour"] in first_caps and set(g["references"]) <= coco_caps
    from vlbench.metrics.decodings import score

    result = json.loads((d / "metrics/transfer/cocoish/gridcap.json").read_text())
    refs = {g["image_id"]: g["references"] for g in generated}
    again = score(refs, {g["image_id"]: g["nearest_neighbour"] for g in generated}, spice=False)
    assert again["CIDEr"] == pytest.approx(result["nearest_neighbour"]["CIDEr"])
    again = score(refs, {g["image_id"]: g["caption"] for g in generated}, spice=False)
    assert again["BLEU-4"] == pytest.approx(result["metrics"]["BLEU-4"])


def test_transfer_metrics_go_to_the_variant_own_mlflow_run(project):
    from mlflow import MlflowClient

    d = project
    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    for v in ("clip", "gridcap"):
        run = client.get_run((d / f"models/{v}/run_id").read_text().strip())
        result = json.loads((d / f"metrics/transfer/cocoish/{v}.json").read_text())
        m = run.data.metrics
        assert run.info.status == "FINISHED" and run.data.tags["variant"] == v
        key = "rsum" if v == "clip" else "CIDEr"
        assert m[f"transfer_cocoish_test_{key}"] == pytest.approx(result["metrics"][key])
        assert f"test_{key}" in m  # the in-domain evaluation, in the same run
        assert {k.removeprefix("transfer_cocoish_") for k in m if k.startswith("transfer_cocoish_test_")} >= {
            f"test_{k}".replace("@", "_at_") for k, x in result["metrics"].items() if isinstance(x, float)}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "transfer/cocoish")}
        assert f"transfer/cocoish/{v}.json" in artifacts
    runs = client.search_runs([client.get_experiment_by_name("vlbench-test").experiment_id])
    assert len(runs) == 2  # no run of its own: the trained variants' runs


def test_report_has_the_transfer_table(project):
    summary = (project / "metrics/summary.md").read_text()
    assert "## Transfer" in summary and "| variant | metric | in-domain | cocoish |" in summary
    own = json.loads((project / "metrics/clip.json").read_text())["metrics"]["rsum"]
    other = json.loads((project / "metrics/transfer/cocoish/clip.json").read_text())["metrics"]["rsum"]
    assert f"| clip | rsum | {own:.1f} | {other:.1f} |" in summary
    cider = json.loads((project / "metrics/transfer/cocoish/gridcap.json").read_text())["metrics"]["CIDEr"]
    assert any(ln.startswith("| gridcap | CIDEr |") and ln.endswith(f" | {cider:.1f} |") for ln in summary.splitlines())
    assert "| *nearest neighbour* (in-domain training captions) | CIDEr |" in summary


def _fails_cleanly(d, args, expected: str):
    """One line naming the problem (exit 2); the earlier results stay as they were, no temp folders."""
    before = {p: p.read_bytes() for p in (d / "metrics/transfer").rglob("*") if p.is_file()}
    r = run_cli(["transfer", *args], cwd=d)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vlbench transfer: bad params: ") and expected in last, last
    assert {p: p.read_bytes() for p in (d / "metrics/transfer").rglob("*") if p.is_file()} == before
    for folder in (d / "data/transfer", d / "metrics/transfer"):
        assert sorted(p.name for p in folder.iterdir()) == ["cocoish"], list(folder.iterdir())
    return last


def test_bad_copies_stop_with_one_line_and_write_nothing(project, tmp_path):
    d = project
    (tmp_path / "empty").mkdir()
    _fails_cleanly(d, ["--dataset", "junk", "--name", "coco", "--root", str(tmp_path / "empty")],
                   f"transfer.datasets.junk.root: {tmp_path / 'empty'} is not a coco copy in a known layout")
    no_test = tmp_path / "no_test"
    coco_copy(no_test, 6, seed=1, karpathy_test=0)
    _fails_cleanly(d, ["--dataset", "notest", "--name", "coco", "--root", str(no_test)],
                   f"transfer.datasets.notest: {no_test} has no test split")
    unsplit = tmp_path / "unsplit"
    coco_copy(unsplit, 6, seed=1, karpathy_test=None)
    _fails_cleanly(d, ["--dataset", "unsplit", "--name", "coco", "--root", str(unsplit)],
                   "transfer.datasets.unsplit.test_size: ")
    broken = tmp_path / "broken"
    coco_copy(broken, 16, seed=1)
    for p in sorted((broken / "val2014").iterdir())[:2]:  # 2 of the 8 test images truncated: 25% > 5%
        p.write_bytes(p.read_bytes()[:60])
    # the configured label itself: a failed rerun keeps its previous results
    _fails_cleanly(d, ["--dataset", "cocoish", "--name", "coco", "--root", str(broken)],
                   "data.max_broken_fraction: 2 of 8 images are missing or broken")


def test_a_copy_without_a_split_is_scored_on_a_seeded_sample(project, tmp_path):
    d = project
    unsplit = tmp_path / "unsplit"
    coco_copy(unsplit, 12, seed=2, karpathy_test=None)
    r = run_cli(["transfer", "--dataset", "sample", "--name", "coco", "--root", str(unsplit), "--test-size", "6",
                 "--variant", "clip"], cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((d / "metrics/transfer/sample/clip.json").read_text())
    assert result["images"] == 6 and result["transfer"]["split_source"].startswith("seeded sample of 6")
    assert not (d / "metrics/transfer/sample/gridcap.json").exists()
    shutil.rmtree(d / "metrics/transfer/sample")
    shutil.rmtree(d / "data/transfer/sample")


def test_the_training_copy_scored_by_transfer_gives_the_evaluate_stage_numbers(project):
    """Transfer onto the very copy the variants were trained and evaluated on: its own features,
    test split and scoring path must reproduce the evaluate stage's results number for number."""
    d = project
    r = run_cli(["transfer", "--dataset", "itself", "--name", "flickr8k", "--root", str(d / "f8k")], cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        for v in ("clip", "gridcap"):
            own = json.loads((d / f"metrics/{v}.json").read_text())
            again = json.loads((d / f"metrics/transfer/itself/{v}.json").read_text())
            assert again["images"] == own["images"] == 10 and again["captions"] == own["captions"]
            assert again["metrics"] == own["metrics"]
            baselines = ("chance", "random_projection") if v == "clip" else ("chance", "nearest_neighbour", "references")
            for b in baselines:
                assert again[b] == own[b], b
        # every decoding of the captioner scored alike (its speed aside), with the same captions
        own, again = (json.loads((d / f).read_text()) for f in ("metrics/gridcap.json", "metrics/transfer/itself/gridcap.json"))
        without_speed = lambda table: {k: {m: x for m, x in row.items() if m != "captions_per_s"} for k, row in table.items()}
        assert again["decoding"] == own["decoding"] and without_speed(again["decodings"]) == without_speed(own["decodings"])
        assert json.loads((d / "metrics/transfer/itself/gridcap_captions.json").read_text()) == \
            json.loads((d / "metrics/gridcap_captions.json").read_text())
    finally:
        shutil.rmtree(d / "metrics/transfer/itself", ignore_errors=True)
        shutil.rmtree(d / "data/transfer/itself", ignore_errors=True)


def test_dvc_stage_with_a_dataset_declares_its_deps_and_runs_after_training(tmp_path):
    """params.yaml ships with no transfer dataset (so tests/test_dvc_deps.py sees no transfer stage):
    with one, the stage declares its code and params and DVC orders it after every train stage."""
    from dvc.repo import Repo

    from test_dvc_deps import ROOT, SRC, _message, check

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "copy").mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["transfer"] == {"datasets": {}}  # the default pipeline is unchanged
    params["transfer"]["datasets"] = {"coco": {"name": "coco", "root": str(tmp_path / "copy")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    problems = check(tmp_path, SRC)
    assert not problems, _message(problems)
    with Repo(str(tmp_path)) as repo:
        stage = next(s for s in repo.index.stages if s.name == "transfer@coco")
        before = {s.name for s in repo.index.graph.successors(stage)}
        report = next(s for s in repo.index.stages if s.name == "report")
        assert stage in set(repo.index.graph.successors(report))
    trains = {f"train@{v}" for v in params["variants"]} | {f"train_pixels@{v}" for v in params["pixel_variants"]}
    assert trains | {"split"} <= before
