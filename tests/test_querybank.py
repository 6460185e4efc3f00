"""Query-bank normalisation (``evaluate.querybank_images``): hubs demoted, the math against the
inverted softmax written out, and the evaluate stage's qb_* numbers and dev-chosen betas against a
naive recomputation from the saved model."""
import json
import math

import pytest
import torch

from conftest import prepare_features, run_cli, tiny_params
from vlbench.metrics.retrieval import querybank_scores, ranks, retrieval_metrics


def _hub_case(direction: str):
    """4 images with one caption each, one gallery item (image 0 for t2i, caption 0 for i2t) close
    to every query; a bank whose queries prefer that hub too."""
    g = torch.Generator().manual_seed(0)
    sim = torch.eye(4) * 0.5 + torch.rand(4, 4, generator=g) * 0.05
    bank = torch.rand(8, 4, generator=g) * 0.05
    if direction == "t2i":
        sim[0, :] += 0.6  # image 0 is the first image of every caption
    else:
        sim[:, 0] += 0.6  # caption 0 is the first caption of every image
    bank[:, 0] += 0.6
    return sim, bank, torch.arange(4)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_querybank_normalisation_demotes_a_hub(direction):
    sim, bank, owner = _hub_case(direction)
    assert retrieval_metrics(sim, owner)[f"{direction}_R@1"] == pytest.approx(25)  # the hub takes 3 of 4 queries
    scores = querybank_scores(sim, bank, 10.0, direction)
    assert retrieval_metrics(scores, owner)[f"{direction}_R@1"] == pytest.approx(100)
    # the inverted softmax written out: exp(b s(q, g)) / sum over the bank of exp(b s(bank, g))
    for g_ in range(4):
        for q in range(4):
            img, cap = (g_, q) if direction == "t2i" else (q, g_)
            expected = math.log(math.exp(10 * sim[img, cap].item()) / sum(math.exp(10 * b) for b in bank[:, g_].tolist()))
            assert scores[img, cap].item() == pytest.approx(expected, abs=1e-4)


def test_a_bank_that_prefers_nothing_keeps_the_raw_order():
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(5, 10, generator=g)
    owner = torch.arange(10) // 2
    flat = torch.full((7, 5), 0.3)  # every bank caption equally close to every image
    assert torch.equal(ranks(querybank_scores(sim, flat, 20.0, "t2i"), owner)[1], ranks(sim, owner)[1])
    with pytest.raises(ValueError, match="i2t' or 't2i"):
        querybank_scores(sim, flat, 20.0, "both")


BETAS = [5.0, 20.0, 50.0]


@pytest.fixture(scope="module")
def querybank_project(tmp_path_factory):
    variants = {"clip": {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                         "optim": {"steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2, "log_every": 5}}}
    params = tiny_params(n_images=60, variants=variants)
    params["split"] = {"seed": 0, "val_size": 12, "test_size": 12}
    params["evaluate"] |= {"querybank_images": 20, "querybank_betas": BETAS}
    d = prepare_features(tmp_path_factory.mktemp("querybank"), params)
    for args in (["train", "--variant", "clip", "--features", "data/features/efficientnet_lite0"],
                 ["evaluate", "--variant", "clip", "--features", "data/features/efficientnet_lite0"],
                 ["report"]):
        r = run_cli(args, cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
    return d


def _naive_r1(img, txt, owner, bank, beta, direction) -> float:
    """R@1 of one direction, each query's scores written out one gallery item at a time in float64
    (beta 0: the raw cosine similarities); ties count for the query, as the evaluate stage's ranks do."""
    def score(i, j):  # image i, caption j
        s = float(img[i] @ txt[j])
        if beta == 0:
            return s
        gallery_bank = [float(b @ txt[j]) for b in bank[0]] if direction == "i2t" else [float(b @ img[i]) for b in bank[1]]
        return math.exp(beta * s) / sum(math.exp(beta * b) for b in gallery_bank)

    hits = []
    if direction == "t2i":
        for j in range(len(txt)):
            scores = [score(i, j) for i in range(len(img))]
            hits.append(not any(s > scores[owner[j]] for s in scores))
    else:
        for i in range(len(img)):
            scores = [score(i, j) for j in range(len(txt))]
            best_own = max(s for s, o in zip(scores, owner) if o == i)
            hits.append(not any(s > best_own for s in scores))
    return 100 * sum(hits) / len(hits)


def _embedded(d):
    """The evaluate stage's metrics of ``clip``, and its saved model's embeddings of the query bank
    and of the dev ("val") and test splits: (metrics, (bank images, bank captions), {split: (images,
    captions, caption -> image row)}, {split: (image ids, captions)})."""
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from vlbench.models.trained import load_trained
    from vlbench.params import load_params, section
    from vlbench.scoring import querybank_split

    m = json.loads((d / "metrics/clip.json").read_text())["metrics"]
    model, cfg, _ = load_trained(d / "models/clip")
    model.eval()
    feats, splits = str(d / "data/features/efficientnet_lite0"), str(d / "data/splits")

    @torch.no_grad()
    def embed(inputs, rows, texts):
        tokens, mask = model.text_tokens(texts, "cpu")
        return model.embed_images(inputs.batch(list(rows))), model.embed_text_features(model.pool_text(tokens, mask))

    bank_inputs, bank_rows, bank_texts = querybank_split(cfg, splits, feats, 20, section(load_params(d / "params.yaml"), "train").seed)
    assert len(bank_rows) == len(bank_texts) == 20
    bank = embed(bank_inputs, bank_rows, bank_texts)
    split, listing = {}, {}
    for name in ("val", "test"):
        inputs = open_inputs(name, splits, feats, cfg)
        caps = captions_by_row(splits, name, inputs.ids)
        listing[name] = list(inputs.ids), [c for cs in caps for c in cs]
        img, txt = embed(inputs, range(len(caps)), listing[name][1])
        split[name] = img, txt, [i for i, cs in enumerate(caps) for _ in cs]
    return m, bank, split, listing


def test_evaluate_reports_querybank_numbers_with_betas_chosen_on_dev(querybank_project):
    d = querybank_project
    m, bank, split, _ = _embedded(d)
    for direction in ("i2t", "t2i"):
        dev = {b: _naive_r1(*split["val"], bank, b, direction) for b in [0.0, *BETAS]}
        best = max(dev.values())
        assert m[f"qb_beta_{direction}"] == min(b for b, v in dev.items() if v == pytest.approx(best))
        test = _naive_r1(*split["test"], bank, m[f"qb_beta_{direction}"], direction)
        assert m[f"qb_{direction}_R@1"] == pytest.approx(test)
        assert m[f"{direction}_R@1"] == pytest.approx(_naive_r1(*split["test"], bank, 0.0, direction))
    assert m["qb_rsum"] == pytest.approx(sum(m[f"qb_{q}_R@{k}"] for q in ("i2t", "t2i") for k in (1, 5, 10)))
    summary = (d / "metrics/summary.md").read_text()
    assert "clip + query-bank normalisation (beta i2t" in summary and "clip (query-bank normalised)" in summary


def test_querybank_params_are_checked():
    from vlbench.errors import ParamError
    from vlbench.params import section

    for bad, says in (({"querybank_images": -1}, "querybank_images"),
                      ({"querybank_images": 10, "querybank_betas": [0.0]}, "querybank_betas")):
        with pytest.raises(ParamError, match=says):
            section({"evaluate": bad}, "evaluate")


def test_served_search_ranks_as_the_t2i_metrics(querybank_project, monkeypatch):
    """The logged search model ranks the test images for a caption by the score the evaluation's t2i
    numbers used (query-bank normalised where dev chose it): its R@1 over every test caption is
    ``qb_t2i_R@1``, and each hit's score is that score written out."""
    import mlflow
    import numpy as np
    import pandas as pd

    from vlbench.data.manifests import read_manifest

    d = querybank_project
    m, bank, split, listing = _embedded(d)
    img, txt, owner = split["test"]
    ids, captions = listing["test"]
    beta = m["qb_beta_t2i"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlflow.db'}")
    run_id = (d / "models/clip/run_id").read_text().strip()
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/search_model")
    out = served.predict(pd.DataFrame({"text": captions}), params={"top_k": len(ids)})
    hits = []
    for j, (got_ids, got_scores) in enumerate(zip(out["image_ids"], out["scores"])):
        assert sorted(got_ids) == sorted(ids)
        for image_id, got in zip(got_ids, got_scores):
            i = ids.index(image_id)
            s = float(img[i] @ txt[j])
            want = s if beta == 0 else beta * s - math.log(sum(math.exp(beta * float(b @ img[i])) for b in bank[1]))
            assert got == pytest.approx(want, abs=1e-4)
        hits.append(got_ids[0] == ids[owner[j]])
    assert 100 * sum(hits) / len(hits) == pytest.approx(m["qb_t2i_R@1"])
    # `vlbench search --variant` ranks and scores as the served model; --raw by cosine
    path_id = dict(zip(*(read_manifest(str(d / "data/splits"), "test")[c] for c in ("path", "image_id"))))
    for flags, want_scores in (([], out["scores"][0]), (["--raw"], None)):
        r = run_cli(["search", captions[0], "--variant", "clip", "--top", str(len(ids)), *flags], cwd=d)
        assert r.returncode == 0, r.stderr[-2000:]
        printed = [line.split("\t") for line in r.stdout.splitlines()]
        if want_scores is not None:
            assert [path_id[p] for _, p in printed] == out["image_ids"][0] and ("query-bank normalised" in r.stderr) == bool(beta)
        else:
            want_scores = [float(img[ids.index(path_id[p])] @ txt[0]) for _, p in printed]
            assert [float(sc) for sc, _ in printed] == sorted((float(sc) for sc, _ in printed), reverse=True)
        assert [float(sc) for sc, _ in printed] == pytest.approx(want_scores, abs=1e-4)
    index = np.load(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/search_model/artifacts/index.npz"))
    assert float(index["qb_beta"]) == beta if beta else "qb_beta" not in index
