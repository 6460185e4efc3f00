"""The cross-attention re-ranker: re-ordering only the top-k, hard negatives, and a reranked
variant through the real train and evaluate stages."""
import json

import pytest
import torch
import yaml

from conftest import prepare_features, run_cli, tiny_params
from vlbench.metrics.retrieval import ranks
from vlbench.models.reranker import hard_negatives, rerank_top_k


def test_rerank_reorders_only_the_top_k():
    # 2 images, 4 captions; caption j belongs to image j // 2
    owner = torch.tensor([0, 0, 1, 1])
    sim = torch.tensor([[0.2, 0.1, 0.9, 0.5],   # img0: own captions ranked 3rd and 4th
                        [0.3, 0.8, 0.7, 0.1]])  # img1: own c2 is 2nd, own c3 last

    def oracle(image_idx, caption_idx):  # a perfect matcher
        return (owner[caption_idx] == image_idx).float()

    i2t_sim, t2i_sim = rerank_top_k(sim, 2, oracle)
    # img0's top-2 are c2, c3 (both wrong): the oracle cannot fix what the dual encoder missed
    assert ranks(i2t_sim, owner)[0].tolist() == [3, 1]  # img1: c2 lifted above c1
    # outside the top-2 the dual encoder's order stays: img0 ranks c0 (0.2) above c1 (0.1)
    assert i2t_sim[0, 0] > i2t_sim[0, 1]
    assert (i2t_sim[0, [2, 3]] > 1).all() and (i2t_sim[0, [0, 1]] <= 1).all()
    # text->image with k=2 = every image: the oracle puts each caption's image first
    assert ranks(t2i_sim, owner)[1].tolist() == [1, 1, 1, 1]
    assert ranks(sim, owner)[1].tolist() == [2, 2, 2, 2]  # before: every caption ranked its image 2nd


def test_reranking_keeps_the_ties_the_metrics_count():
    """Captions with the same text under several images (the shapes data: 1,288 distinct of 1,500)
    tie in the dual encoder's scores, and the metrics count a tie for the query. Re-ranking by the
    dual encoder's own order (weight 0) must then give its recalls exactly, whichever few of a tie
    ``topk`` kept, and a re-ranker that scores equal texts alike must keep them tied."""
    from vlbench.models.reranker import reorder_top_k, top_k_scores

    g = torch.Generator().manual_seed(0)
    texts = torch.randint(0, 6, (40,), generator=g)  # 40 captions of 6 distinct texts
    owner = torch.arange(40) // 5                    # 8 images x 5 captions
    sim = torch.rand(8, 6, generator=g)[:, texts]    # a caption's score is its text's
    flip = top_k_scores(sim, 3, lambda i, c: torch.rand(len(i), generator=g))  # noise: ties in it break
    for keep in (lambda first, itm: first, lambda first, itm: 10 * first + 0.0 * itm):
        i2t, t2i = reorder_top_k(sim, flip, keep)
        assert ranks(i2t, owner)[0].tolist() == ranks(sim, owner)[0].tolist()
        assert ranks(t2i, owner)[1].tolist() == ranks(sim, owner)[1].tolist()
    # a matcher that knows the text: image i's own texts first; tied captions stay tied
    own_text = lambda i, c: torch.tensor([float((texts[owner == a] == texts[b]).any()) for a, b in zip(i, c)])  # noqa: E731
    i2t, _ = reorder_top_k(sim, top_k_scores(sim, 3, own_text), lambda first, itm: itm)
    for i in range(8):
        shown = i2t[i]
        assert all(shown[a] == shown[b] for a in range(40) for b in range(40) if texts[a] == texts[b])
    assert ranks(i2t, owner)[0].float().mean() <= ranks(sim, owner)[0].float().mean()


def test_dev_weight_follows_what_the_matcher_is_worth():
    from vlbench.models.reranker import DEV_WEIGHTS, top_k_scores
    from vlbench.scoring import pick_rerank_weight

    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor([[0.5, 0.1, 0.6, 0.2, 0.0, 0.0],   # img0: its c0 2nd, behind c2
                        [0.1, 0.2, 0.3, 0.5, 0.6, 0.1],   # img1: its c3 2nd, behind c4
                        [0.0, 0.3, 0.0, 0.1, 0.9, 0.4]])  # img2: its c4 1st

    def order_for(w):  # the dual encoder's logit (scale 10) plus w x the matcher's
        return lambda first, itm: 10 * first + w * itm

    oracle = top_k_scores(sim, 2, lambda i, c: 8.0 * (owner[c] == i).float())
    w, tried = pick_rerank_weight(sim, oracle, owner, order_for)
    assert all(list(tried[d]) == list(DEV_WEIGHTS) for d in ("i2t", "t2i"))
    # each direction its own first weight that fixes every fixable query: img0's and img1's own
    # captions trail by 0.1 (x10 = 1), which 0.1 x 8 does not outweigh and 0.25 x 8 does; caption
    # c2's own image trails by 0.3 (x10 = 3), which needs 0.5 x 8
    assert w == {"i2t": 0.25, "t2i": 0.5}
    assert tried["i2t"][0.1] < tried["i2t"][0.25] == max(tried["i2t"].values())
    assert tried["t2i"][0.25] < tried["t2i"][0.5] == max(tried["t2i"].values())
    liar = top_k_scores(sim, 2, lambda i, c: 8.0 * (owner[c] != i).float())  # prefers the wrong pair
    w, tried = pick_rerank_weight(sim, liar, owner, order_for)
    assert w == {"i2t": 0.0, "t2i": 0.0}
    assert all(tried[d][0.0] == max(tried[d].values()) for d in ("i2t", "t2i"))
    assert tried["t2i"][4.0] < tried["t2i"][0.0]  # caption c0's own image, first, falls behind img1


def test_hard_negatives_are_never_the_matched_pair_and_follow_similarity():
    torch.manual_seed(0)
    logits = torch.zeros(6, 6)
    logits[0, 3] = logits[3, 0] = 20.0  # caption 3 is by far the most confusable for image 0
    for _ in range(20):
        neg_text, neg_image = hard_negatives(logits + torch.eye(6) * 100)  # even a dominant diagonal is never drawn
        assert (neg_text != torch.arange(6)).all() and (neg_image != torch.arange(6)).all()
        assert neg_text[0] == 3 and neg_image[0] == 3


@torch.no_grad()
def test_scan_scores_words_and_regions_against_what_they_attend_to():
    # SCAN's score, one pair and one word (region) at a time: each word's softmax attention over the
    # regions, its cosine with the attended vector, the mean over the caption's own words; the same
    # from each region over the caption's own words; the two averaged
    from vlbench.models.reranker import RerankerConfig, ScanMatcher, scan_loss

    g = torch.Generator().manual_seed(0)
    matcher = ScanMatcher(6, 5, 4, RerankerConfig(top_k=3, kind="scan", d_model=8))
    tokens, grid = torch.randn(3, 5, 6, generator=g), torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).float()
    text, m, image = matcher.project(tokens, mask, grid)

    def naive(i, j):
        words = torch.nn.functional.normalize(matcher.text_in(tokens[j, : int(mask[j].sum())]), dim=-1)
        regions = torch.nn.functional.normalize(matcher.image_in(grid[i]), dim=-1)
        lam = matcher.attention_scale.exp()
        text_to_image = image_to_text = 0.0
        for w in words:
            a = torch.softmax(lam * (regions @ w), 0)
            text_to_image += torch.nn.functional.cosine_similarity(w, a @ regions, dim=0) / len(words)
        for r in regions:
            a = torch.softmax(lam * (words @ r), 0)
            image_to_text += torch.nn.functional.cosine_similarity(r, a @ words, dim=0) / len(regions)
        return matcher.logit_scale.exp() * (text_to_image + image_to_text) / 2

    expected = torch.tensor([[naive(i, j) for j in range(3)] for i in range(2)])
    assert torch.allclose(matcher.pairwise(text, m, image), expected, atol=1e-5)
    i, j = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    assert torch.allclose(matcher.score(text[j], m[j], image[i]), expected[i, j], atol=1e-5)
    # the loss: InfoNCE over all pairs both ways, entries the dual encoder masked (-inf) left out
    logits = torch.zeros(3, 3)
    logits[0, 2] = float("-inf")
    scores = torch.tensor([[naive(i % 2, j) for j in range(3)] for i in range(3)])  # pair 2 shows image 0 again
    scores[0, 2] = float("-inf")
    ce = torch.nn.functional.cross_entropy
    reference = (ce(scores, torch.arange(3)) + ce(scores.t(), torch.arange(3))) / 2
    got = scan_loss(matcher, logits, tokens, mask, grid[[0, 1, 0]])
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    # told which pairs show one image, it scores that image once: the same loss
    once = scan_loss(matcher, logits, tokens, mask, grid[[0, 1, 0]], image_ids=torch.tensor([7, 3, 7]))
    assert once.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.fixture(scope="module", params=["fusion", "scan"])
def reranked_project(tmp_path_factory, request):
    variants = {"clip_rr": {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                            "reranker": {"top_k": 5, "d_model": 64, "layers": 1, "kind": request.param},
                            "optim": {"steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2, "log_every": 5}}}
    d = prepare_features(tmp_path_factory.mktemp("rerank"), tiny_params(n_images=60, variants=variants))
    for args in (["train", "--variant", "clip_rr", "--features", "data/features/efficientnet_lite0"],
                 ["evaluate", "--variant", "clip_rr", "--features", "data/features/efficientnet_lite0"],
                 ["report"]):
        r = run_cli(args, cwd=d)
        assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_reranked_variant_reports_both_recalls_and_its_cost(reranked_project):
    result = json.loads((reranked_project / "metrics/clip_rr.json").read_text())
    m = result["metrics"]
    # the recalls again, by a naive reference from the saved model: its similarities, recomputed here, and
    # its re-ranker's score of each candidate pair, one pair at a time
    import numpy as np
    import pandas as pd

    from vlbench.models.trained import load_trained

    model, cfg, _ = load_trained(reranked_project / "models/clip_rr")
    model.eval()
    feats = reranked_project / "data/features/efficientnet_lite0"
    order = json.loads((feats / "test_ids.json").read_text())
    captions = pd.read_parquet(reranked_project / "data/splits/test.parquet").set_index("image_id").loc[order, "captions"]
    flat = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    grid = torch.from_numpy(np.load(feats / "test.npy")).float()
    with torch.no_grad():
        tokens, mask = model.text_tokens(flat, "cpu", pad_to=cfg.max_text_len)
        sim = (model.embed_images(grid) @ model.embed_text_features(model.pool_text(tokens, mask)).T).tolist()

        def match(i, j):  # the re-ranker's score of image i with caption j
            n = int(mask[j].sum())
            itm = model.reranker(tokens[j : j + 1, :n], mask[j : j + 1, :n], grid[i : i + 1]).item()
            weight = m[f"rerank_weight_{direction}"]  # combine: dev, each direction's weight chosen on the dev split
            return weight * itm + model.scale().item() * sim[i][j]

        def candidates(i=None, j=None):  # (image, caption) pairs of one query, best first by similarity
            pairs = [(i, c) for c in range(len(flat))] if j is None else [(q, j) for q in range(len(captions))]
            return sorted(pairs, key=lambda p: (-sim[p[0]][p[1]], owner[p[1]] != p[0]))

        def recall(queries, k, score=None):  # % of queries with a match among their k best candidates
            hits = 0
            for pairs in queries:
                if score:  # re-rank the top-k by the re-ranker
                    pairs = sorted(pairs[: cfg.reranker.top_k], key=lambda p: (-score(*p), owner[p[1]] != p[0]))
                hits += any(owner[c] == i for i, c in pairs[:k])
            return 100 * hits / len(queries)

        by_direction = {"i2t": [candidates(i=i) for i in range(len(captions))],
                        "t2i": [candidates(j=j) for j in range(len(flat))]}
        for direction, queries in by_direction.items():
            for k in (1, 5, 10):
                assert m[f"{direction}_R@{k}"] == pytest.approx(recall(queries, k)), (direction, k)
            assert m[f"reranked_{direction}_R@1"] == pytest.approx(recall(queries, 1, match)), direction
    for direction in ("i2t", "t2i"):
        # re-ranking the top-5 cannot move a hit in or out of the top-5 ... only within it
        assert m[f"reranked_{direction}_R@5"] == pytest.approx(m[f"{direction}_R@5"])
        assert m[f"reranked_{direction}_R@10"] == pytest.approx(m[f"{direction}_R@10"])
    assert result["speed"]["rerank_ms_per_1000_queries"] > 0 and result["speed"]["ms_per_1000_queries"] > 0
    assert result["rerank_top_k"] == 5
    from vlbench.models.reranker import DEV_WEIGHTS

    assert m["rerank_weight_i2t"] in DEV_WEIGHTS and m["rerank_weight_t2i"] in DEV_WEIGHTS  # reranker.combine: dev (the default)
    rp = result["random_projection"]
    assert set(rp) >= {"i2t_R@1", "t2i_R@10", "rsum"}
    summary = (reranked_project / "metrics/summary.md").read_text()
    assert "clip_rr + cross-attention re-rank of top-5" in summary
    assert "random projections" in summary and "vs random projections" in summary
    # the saved model holds the re-ranker, and reloads with it
    from vlbench.models.trained import load_trained

    model, cfg, _ = load_trained(reranked_project / "models/clip_rr")
    assert model.reranker is not None and cfg.reranker.top_k == 5
    assert type(model.reranker).__name__ == {"fusion": "CrossAttentionReranker", "scan": "ScanMatcher"}[cfg.reranker.kind]


def test_reranker_params_are_validated(tmp_path):
    params = tiny_params()
    params["variants"]["clip"]["reranker"] = {"top_k": 5, "d_model": 60, "heads": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = run_cli(["check"], cwd=tmp_path)
    assert r.returncode == 2 and "variants.clip.reranker.heads" in r.stderr
    params["variants"]["clip"]["reranker"] = {"top_k": 5, "kind": "colbert"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = run_cli(["check"], cwd=tmp_path)
    assert r.returncode == 2 and "variants.clip.reranker.kind" in r.stderr


@torch.no_grad()
def test_cached_token_states_equal_each_caption_encoded_alone():
    # the re-ranker's text cache encodes captions in batches padded to their longest and fills the
    # rest to max_text_len with zeros: every caption's states and pooled feature must be what it gets
    # encoded on its own, and everything past its own end must be masked out
    from vlbench.models.variants import build_variant, create_variant_model
    from vlbench.training import encode_texts

    cfg = build_variant("t", {"family": "alignment", "model": "dual_encoder", "image_encoder": "efficientnet_lite0",
                              "text_encoder": "minilm_l6", "text_pooling": "mean", "max_text_len": 24,
                              "reranker": {"top_k": 2, "d_model": 16, "layers": 1, "heads": 2}})
    model = create_variant_model(cfg, 8, 4).eval()
    texts = ["a dog", "a man in a red shirt rides a bike down a steep hill in the rain", "a dog",
             "two children play on the beach near the water"]
    pooled, tokens, masks = encode_texts(model, texts, "cpu", batch_size=2, keep_tokens=True)
    assert tokens.shape[:2] == masks.shape == (4, 24)
    for k, text in enumerate(texts):
        alone, mask = model.text_tokens([text], "cpu")
        n = int(mask.sum())
        assert int(masks[k].sum()) == n and masks[k, n:].sum() == 0
        torch.testing.assert_close(tokens[k, :n], alone[0, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled[k], model.pool_text(alone, mask)[0], atol=1e-4, rtol=1e-4)
