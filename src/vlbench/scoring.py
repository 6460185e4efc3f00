"""Scoring a trained variant on one split's images: the metrics and baselines of the evaluate stage,
shared with the transfer stage (the same numbers on another dataset's test split).

Alignment: recall@1/5/10 both ways (captions grouped per image), median/mean rank, next to chance and
random projections of the pretrained features; optionally the same recall after query-bank
normalisation (a bank of training images and captions, each direction's inverse temperature chosen on
the dev split; ``evaluate.querybank_images``). Captioning: pycocoevalcap metrics under each decoding,
next to chance (a random training caption) and the nearest training image's caption.
"""
from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import io
from .data.manifests import captions_by_row, read_manifest
from .errors import ParamError
from .image_features import load_features
from .inputs import check_features, open_inputs
from .metrics.retrieval import both_ways, chance_recall, querybank_offsets, querybank_scores, retrieval_metrics
from .models.protocols import AlignmentModel, CaptioningModel
from .models.reranker import DEV_WEIGHTS, reorder_top_k, top_k_scores
from .models.trained import load_trained
from .params import section
from .runtime import seed_everything
from .training import encode_texts


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def random_projection_baseline(image_pooled: torch.Tensor, text_pooled: torch.Tensor, owner: torch.Tensor,
                               dim: int, seed: int) -> dict[str, float]:
    """Zero-training floor: the same pretrained features, each side through its own random
    Gaussian projection into a shared space, cosine similarity."""
    g = torch.Generator().manual_seed(seed)
    proj_img = torch.randn(image_pooled.shape[1], dim, generator=g).to(image_pooled)
    proj_txt = torch.randn(text_pooled.shape[1], dim, generator=g).to(text_pooled)
    img = torch.nn.functional.normalize(image_pooled @ proj_img, dim=-1)
    txt = torch.nn.functional.normalize(text_pooled @ proj_txt, dim=-1)
    return retrieval_metrics(img @ txt.t(), owner)


def _image_batches(inputs, rows, batch_size: int, device):
    """The rows ``rows`` of ``inputs`` (cached token grids, or pixels for a model that holds its image
    encoder), in batches on ``device``."""
    rows = list(rows)
    for s in range(0, len(rows), batch_size):
        yield inputs.batch(rows[s : s + batch_size]).to(device)


def embed_image_batches(model: AlignmentModel, batches, flip: bool = False) -> torch.Tensor:
    """Normalised embeddings of the images in ``batches``. ``flip`` (``evaluate.test_time_flip``, for
    pixels only): the normalised mean of each image's and its mirror image's embeddings."""
    out = []
    for b in batches:
        e = model.embed_images(model.image_tokens(b))
        if flip:
            e = torch.nn.functional.normalize(e + model.embed_images(model.image_tokens(b.flip(-1))), dim=-1)
        out.append(e)
    return torch.cat(out)


def _rerank_scores(model: AlignmentModel, sim, tokens, masks, image_tokens) -> dict:
    """The re-ranker's matching logits of each query's top-k candidates, both directions."""
    text_p, mask_p, image_p = model.reranker.project(tokens, masks, image_tokens)

    def score(image_idx, caption_idx):
        return model.reranker.score(text_p[caption_idx], mask_p[caption_idx], image_p[image_idx])

    return top_k_scores(sim, model.cfg.reranker.top_k, score)


def _rerank_order(model: AlignmentModel, weight: float):
    """What orders the top-k: the matching logit alone (combine: itm), or the dual encoder's logit
    plus ``weight`` x it."""
    if model.cfg.reranker.combine == "itm":
        return lambda first, itm: itm
    return lambda first, itm: model.scale() * first + weight * itm


def dev_split(cfg, splits_dir: str, features_dir: str | None, querybank: bool = False):
    """(inputs, captions) of the dev split where an alignment variant needs it at scoring time (a
    re-ranker with ``combine: dev``, or ``querybank``: query-bank normalisation's beta), else None."""
    reranker = getattr(cfg, "reranker", None)
    rerank_dev = reranker is not None and reranker.top_k and reranker.combine == "dev"
    if not (rerank_dev or querybank):
        return None
    inputs = open_inputs("val", splits_dir, features_dir, cfg)
    return inputs, captions_by_row(splits_dir, "val", inputs.ids)


def querybank_split(cfg, splits_dir: str, features_dir: str | None, n_images: int, seed: int):
    """The query bank: ``n_images`` random training images (all of them when there are fewer) and one
    random caption of each. -> (inputs, rows, captions)."""
    inputs = open_inputs("train", splits_dir, features_dir, cfg)
    rng = random.Random(seed)
    rows = sorted(rng.sample(range(len(inputs)), min(n_images, len(inputs))))
    captions = captions_by_row(splits_dir, "train", [inputs.ids[i] for i in rows])
    return inputs, rows, [rng.choice(c) for c in captions]


@torch.no_grad()
def _embed(model: AlignmentModel, inputs, rows, texts: list[str], device, batch_size: int, desc: str, flip: bool):
    """Normalised embeddings of the images at ``rows`` of ``inputs`` (``flip``: ``embed_image_batches``)
    and of ``texts``."""
    img = embed_image_batches(model, _image_batches(inputs, rows, batch_size, device), flip)
    return img, model.embed_text_features(encode_texts(model, texts, device, desc=desc)[0])


def _bank_sim(bank_img, bank_txt, img, txt, queries: str) -> torch.Tensor:
    """The bank's similarities that query-bank normalisation of one direction needs: the bank images
    against the captions (i2t) or the bank captions against the images (t2i)."""
    return bank_img @ txt.t() if queries == "i2t" else bank_txt @ img.t()


def _querybank(sim, bank_sim, beta: float, queries: str) -> torch.Tensor:
    """One direction's scores under query-bank normalisation; beta 0 = the raw similarities."""
    return sim if beta == 0 else querybank_scores(sim, bank_sim, beta, queries)


def choose_beta(sim, bank_img, bank_txt, img, txt, owner, betas, queries: str) -> tuple[float, dict[float, float]]:
    """One direction's query-bank beta: the best R@1 of ``sim`` (the dev split) among 0 (the raw
    similarities) and ``betas``; a tie keeps the smaller. -> (beta, {beta: R@1})."""
    bank_sim = _bank_sim(bank_img, bank_txt, img, txt, queries)  # one product for every beta
    tried = {b: retrieval_metrics(_querybank(sim, bank_sim, b, queries), owner)[f"{queries}_R@1"] for b in (0.0, *betas)}
    return max(tried, key=lambda b: (tried[b], -b)), tried


@torch.no_grad()
def querybank_metrics(model: AlignmentModel, img, txt, owner, dev, bank, betas, device, batch_size,
                      flip: bool = False) -> tuple[dict, dict]:
    """``evaluate.querybank_images``: the test metrics under query-bank normalisation (``qb_*``, and
    the inverse temperature of each direction, ``qb_beta_i2t``/``qb_beta_t2i``), each direction's
    beta chosen on the dev split (``dev``: inputs, captions) by its R@1 among 0 (the raw
    similarities) and ``betas``; a tie keeps the smaller. ``bank``: ``querybank_split``; ``flip``: the
    dev images are embedded as the test images were (``embed_image_batches``).
    -> (metrics, {direction: {beta: dev R@1}}, the t2i normalisation of each test image: its
    logsumexp over the bank captions, which text search subtracts (``search_offsets``))."""
    # the bank's images stay single-view: flipping them too moved the best dev R@1 by 0.3 at twice the
    # bank's cost (benchmarks/RESULTS.md, test_time_flip.py)
    bank_img, bank_txt = _embed(model, bank[0], bank[1], bank[2], device, batch_size, "query-bank captions", False)
    dev_inputs, dev_captions = dev
    dev_img, dev_txt = _embed(model, dev_inputs, range(len(dev_captions)), [c for caps in dev_captions for c in caps],
                              device, batch_size, "dev captions", flip)
    dev_owner = torch.tensor([i for i, caps in enumerate(dev_captions) for _ in caps], device=device)
    dev_sim = dev_img @ dev_txt.t()
    chosen, tried = {}, {}
    for q in ("i2t", "t2i"):
        chosen[q], tried[q] = choose_beta(dev_sim, bank_img, bank_txt, dev_img, dev_txt, dev_owner, betas, q)
    sim = img @ txt.t()
    metrics = both_ways(*(_querybank(sim, _bank_sim(bank_img, bank_txt, img, txt, q), chosen[q], q) for q in ("i2t", "t2i")),
                        owner)
    out = {f"qb_{k}": v for k, v in metrics.items()}
    offsets = search_offsets(bank_txt, img, chosen["t2i"])
    return out | {"qb_beta_i2t": float(chosen["i2t"]), "qb_beta_t2i": float(chosen["t2i"])}, tried, offsets


def search_offsets(bank_txt: torch.Tensor, img: torch.Tensor, beta: float) -> torch.Tensor:
    """What query-bank normalisation subtracts from ``beta`` x a text query's cosine with each image
    (``querybank_scores``, t2i): it depends on the images and the bank only, so a search index stores
    it beside the image embeddings. Zeros for beta 0 (the raw similarities)."""
    if beta == 0:
        return torch.zeros(len(img), device=img.device)
    return querybank_offsets(bank_txt @ img.t(), beta)


def pick_rerank_weight(sim, scores, owner, order_for) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """For each direction the weight w (DEV_WEIGHTS) whose order ``order_for(w)`` of each query's
    top-k (``scores``: ``top_k_scores``) gives the best R@1; the first best, so a tie keeps the smaller
    weight (w = 0: the dual encoder's own order). As query-bank normalisation's betas, one per
    direction: ranking captions for an image and images for a caption are two tasks, and a matcher
    can be worth more in one. -> ({direction: w}, {direction: {w: R@1}})."""
    tried = {"i2t": {}, "t2i": {}}
    for w in DEV_WEIGHTS:
        i2t_sim, t2i_sim = reorder_top_k(sim, scores, order_for(w))
        tried["i2t"][w] = retrieval_metrics(i2t_sim, owner)["i2t_R@1"]
        tried["t2i"][w] = retrieval_metrics(t2i_sim, owner)["t2i_R@1"]
    return {d: max(t, key=lambda w: (t[w], -w)) for d, t in tried.items()}, tried


@torch.no_grad()
def rerank_candidates(model: AlignmentModel, inputs, captions, device, batch_size, desc: str = "dev captions"):
    """The dual encoder's similarities of a split (``inputs``, ``captions``: its rows), the matcher's
    logits of each query's top-k (``top_k_scores``) and each caption's image -> (sim, scores, owner)."""
    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], device=device)
    image_tokens = torch.cat([model.image_tokens(b) for b in _image_batches(inputs, range(len(captions)), batch_size, device)])
    pooled, tokens, masks = encode_texts(model, flat, device, keep_tokens=True, desc=desc)
    sim = model.embed_images(image_tokens) @ model.embed_text_features(pooled).t()
    return sim, _rerank_scores(model, sim, tokens, masks, image_tokens), owner


def choose_rerank_weight(model: AlignmentModel, inputs, captions, device, batch_size) -> tuple[dict, dict]:
    """``reranker.combine: dev``: ``pick_rerank_weight`` on the dev split (``inputs``, ``captions``: its rows)."""
    sim, scores, owner = rerank_candidates(model, inputs, captions, device, batch_size)
    return pick_rerank_weight(sim, scores, owner, lambda w: _rerank_order(model, w))


@torch.no_grad()
def evaluate_alignment(model: AlignmentModel, inputs, captions, paths, device, batch_size, n_pictures, picture_path,
                       seed, dev=None, bank=None, betas=(), flip: bool = False):
    """``dev``: (inputs, captions) of the dev split, on which ``reranker.combine: dev`` chooses the
    re-ranker's weights (``metrics["rerank_weight_i2t"]``, ``_t2i``) and query-bank normalisation its betas;
    ``bank``: the query bank (``querybank_split``), None = no query-bank normalisation; ``flip``:
    test-time flip of the images (``embed_image_batches``; pixel inputs only).
    -> (metrics, baselines, speed, None, search index of the test images: see ``score_test_split``)."""
    n = len(captions)  # the first n rows of ``inputs``

    def image_batches():
        return _image_batches(inputs, range(n), batch_size, device)

    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    t0 = time.perf_counter()
    img = embed_image_batches(model, image_batches(), flip)
    keep_tokens = model.reranker is not None
    pooled, tokens, masks = encode_texts(model, flat, device, keep_tokens=keep_tokens, desc="embed captions")
    txt = model.embed_text_features(pooled)
    sim = img @ txt.t()
    seconds = time.perf_counter() - t0
    metrics = retrieval_metrics(sim, owner.to(device))
    search_index = {"embeddings": img.cpu().numpy()}  # the served text search ranks as the t2i metrics do
    if bank is not None:
        if dev is None:
            raise ValueError("query-bank normalisation needs the dev split to choose its betas on")
        qb, tried, offsets = querybank_metrics(model, img, txt, owner.to(device), dev, bank, betas, device, batch_size, flip)
        metrics |= qb
        search_index |= {"qb_beta": qb["qb_beta_t2i"], "qb_offsets": offsets.cpu().numpy()}
        for q in ("i2t", "t2i"):
            print(f"query-bank beta ({q}) chosen on dev: " + ", ".join(
                f"{'*' if b == qb[f'qb_beta_{q}'] else ''}{b:g}: R@1 {v:.1f}" for b, v in tried[q].items()), file=sys.stderr)
    # one query = one caption (t2i) or one image (i2t); the cost is embedding both sides + one matmul
    speed = {"queries_per_s": len(flat) / seconds, "ms_per_1000_queries": seconds / (len(flat) + n) * 1e6}
    if keep_tokens:
        weights = {"i2t": 1.0, "t2i": 1.0}  # combine: sum
        if model.cfg.reranker.combine == "dev":
            if dev is None:
                raise ValueError("reranker.combine: dev needs the dev split to choose the re-ranker's weight on")
            weights, tried = choose_rerank_weight(model, *dev, device, batch_size)
            for d in ("i2t", "t2i"):
                metrics[f"rerank_weight_{d}"] = weights[d]
                print(f"re-ranker weight ({d}) chosen on dev: " + ", ".join(
                    f"{'*' if w == weights[d] else ''}{w:g}: R@1 {v:.1f}" for w, v in tried[d].items()), file=sys.stderr)
        image_tokens = torch.cat([model.image_tokens(b) for b in image_batches()])
        t0 = time.perf_counter()
        i2t_sim, t2i_sim = reorder_top_k(sim, _rerank_scores(model, sim, tokens, masks, image_tokens),
                                         {d: _rerank_order(model, w) for d, w in weights.items()})
        rerank_seconds = time.perf_counter() - t0
        reranked = both_ways(i2t_sim, t2i_sim, owner.to(device))
        metrics |= {f"reranked_{k}": v for k, v in reranked.items()}
        speed["rerank_ms_per_1000_queries"] = rerank_seconds / (len(flat) + n) * 1e6
        sim = t2i_sim  # the gallery (caption -> images) shows what the re-ranked model returns
    pretrained = None  # the untuned image encoder, when the model tuned its own
    if model.image_encoder is not None:
        from .models.registry import create_image_encoder

        pretrained = create_image_encoder(model.cfg.image_encoder).to(device).eval()
    image_pooled = torch.cat([(pretrained(b) if pretrained else b).float().mean(1) for b in image_batches()])
    text_pooled = pooled if model.cfg.text_tuning == "frozen" else None
    if text_pooled is None:  # a tuned encoder is not "zero-training": use the pretrained one
        from .models.dual_encoder import pool_tokens
        from .models.registry import create_text_encoder

        enc = create_text_encoder(model.cfg.text_encoder)
        enc.model.to(device).eval()
        chunks = []
        for s in range(0, len(flat), batch_size):
            b = enc.tokenizer(flat[s : s + batch_size], padding=True, truncation=True, max_length=model.cfg.max_text_len,
                              return_tensors="pt").to(device)
            chunks.append(pool_tokens(enc.model(**b).last_hidden_state, b["attention_mask"], model.cfg.text_pooling))
        text_pooled = torch.cat(chunks)
    random_proj = random_projection_baseline(image_pooled, text_pooled.float(), owner.to(device), model.cfg.embed_dim, seed)
    per_image = max(1, round(len(flat) / len(captions)))
    chance = chance_recall(len(captions), per_image)
    # gallery: a few caption queries -> top-5 images
    picks = list(range(0, len(flat), max(1, len(flat) // n_pictures)))[:n_pictures]
    results = []
    for j in picks:
        top = sim[:, j].topk(5)
        results.append([(paths[i], s.item(), i == owner[j].item()) for s, i in zip(top.values, top.indices.tolist())])
    from .pictures import retrieval_gallery

    retrieval_gallery([flat[j] for j in picks], results, picture_path)
    return metrics, {"chance": chance, "random_projection": random_proj}, speed, None, search_index


def nearest_neighbour_captions(test_feats, train_feats, train_captions: list[list[str]], chunk: int = 1024) -> list[str]:
    """Baseline: each test image gets the first caption of its most similar training image
    (cosine similarity of mean-pooled image features)."""
    from .models.consensus import pooled_image_features

    def pooled(f):
        return pooled_image_features(torch.from_numpy(np.array(f[s : s + chunk])) for s in range(0, len(f), chunk))

    nearest = (pooled(test_feats) @ pooled(train_feats).t()).argmax(1)
    return [train_captions[i][0] for i in nearest.tolist()]


def evaluate_captioning(model: CaptioningModel, cfg, feats, captions, ids, paths, train_feats, train_captions, device,
                        batch_size, n_pictures, picture_path, seed, decodings=("greedy", "beam")):
    """Captions of the test images under each decoding of ``evaluate.decodings`` and the variant's own
    (metrics/decodings.py), each scored once; the headline metrics are those of the variant's own."""
    from .metrics.decodings import decodings_to_compare, score
    from .metrics.diversity import diversity

    refs = {i: list(c) for i, c in zip(ids, captions)}
    runs, head = decodings_to_compare(cfg.decoding, decodings)
    table, by_decoding = {}, {}
    for dname, dec in runs.items():
        gen = torch.Generator(device=device).manual_seed(seed)  # every decoding samples from the same seed
        hyps, t0 = [], time.perf_counter()
        for s in tqdm(range(0, len(feats), batch_size), desc=f"caption ({dname})", unit="batch"):
            grid = torch.from_numpy(np.array(feats[s : s + batch_size])).to(device)
            hyps.extend(model.generate(grid, dec, generator=gen))
        seconds = time.perf_counter() - t0
        by_decoding[dname] = hyps
        table[dname] = {**score(refs, dict(zip(ids, hyps))), "captions_per_s": len(ids) / seconds}
    hyps = by_decoding[head]
    metrics = {k: v for k, v in table[head].items() if k != "captions_per_s"}
    rng = random.Random(seed)
    chance_hyps = {i: rng.choice(rng.choice(train_captions)) for i in ids}
    chance = score(refs, chance_hyps, spice=False)
    nn_hyps = dict(zip(ids, nearest_neighbour_captions(feats, train_feats, train_captions)))
    nearest = score(refs, nn_hyps, spice=False)
    speed = {"captions_per_s": table[head]["captions_per_s"]}
    from .pictures import caption_grid

    caption_grid(paths[:n_pictures], hyps[:n_pictures], [c[0] for c in captions[:n_pictures]], picture_path)
    generated = [{"image_id": i, "caption": h, "nearest_neighbour": nn_hyps[i], "references": refs[i],
                  "decodings": {d: c[j] for d, c in by_decoding.items()}} for j, (i, h) in enumerate(zip(ids, hyps))]
    human = diversity([c[0] for c in captions])  # the first human reference of each image
    return metrics, {"chance": chance, "nearest_neighbour": nearest, "references": human, "decoding": head,
                     "decodings": table}, speed, generated


def score_test_split(name: str, model_dir: Path, raw: dict, test_dir: Path, test_features: Path | None,
                     own_splits: Path, own_features: Path | None, metrics_dir: Path, device,
                     extra: dict | None = None) -> tuple[dict, list[str], tuple | None]:
    """One trained variant on the test split in ``test_dir`` (its ``test.parquet``; image tokens from
    ``test_features``, None for a pixel variant): metrics, baselines, speed and memory. The variant's
    own training data (``own_splits``, ``own_features``) gives the re-ranker's dev split and the
    captioning baselines. Writes ``<metrics_dir>/<name>.json`` (the result, with ``extra``), the
    picture and, for captioners, ``<name>_captions.json``. -> (result, the scored images' paths,
    an alignment variant's search index of its test images, else None: ``image_ids``, ``embeddings``
    and, under query-bank normalisation, ``qb_beta`` and ``qb_offsets`` (``search_offsets``))."""
    ecfg, tcfg = section(raw, "evaluate"), section(raw, "train")
    seed_everything(tcfg.seed)
    model, cfg, meta = load_trained(model_dir)
    model.to(device)
    pixels = meta.get("input") == "pixels"
    if pixels == (test_features is not None):
        raise ParamError(f"{name}: " + ("a pixel variant reads images, not --features" if pixels else
                                        "needs --features (its cached image tokens)"))

    def check(folder: Path) -> None:  # features of another encoder or image size would score silently wrong
        fmeta = check_features(folder, cfg.image_encoder, f"variants.{name}.image_encoder",
                               section(raw, "features").image_size)
        if meta.get("image_size") not in (None, fmeta["image_size"]):
            raise ParamError(f"variants.{name}: {model_dir} was trained on images resized to {meta['image_size']}, "
                             f"but {folder} holds {fmeta['image_size']}: train it again")

    if test_features is not None:
        check(test_features)
    inputs = open_inputs("test", str(test_dir), str(test_features) if test_features else None, cfg)
    df = read_manifest(test_dir, "test").set_index("image_id").loc[inputs.ids]
    n = len(inputs.ids) if ecfg.max_images == 0 else min(ecfg.max_images, len(inputs.ids))
    ids = inputs.ids[:n]
    captions = [list(c) for c in df["captions"][:n]]
    paths = list(df["path"][:n])
    picture = Path(metrics_dir) / "pictures" / f"{name}.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    search_index = None
    if cfg.family == "alignment":
        own_features_dir = str(own_features) if own_features else None
        metrics, baselines, speed, generated, search_index = evaluate_alignment(
            model, inputs, captions, paths, device, ecfg.batch_size, ecfg.picture_images, picture, tcfg.seed,
            dev=dev_split(cfg, str(own_splits), own_features_dir, querybank=bool(ecfg.querybank_images)),
            bank=querybank_split(cfg, str(own_splits), own_features_dir, ecfg.querybank_images, tcfg.seed)
            if ecfg.querybank_images else None, betas=ecfg.querybank_betas, flip=ecfg.test_time_flip and pixels)
        search_index["image_ids"] = [str(i) for i in ids]  # the served search model's images
    else:  # baselines from the variant's own training split
        if own_features != test_features:
            check(own_features)
        train_feats, train_ids = load_features(own_features, "train")
        by_id = dict(read_manifest(own_splits, "train")[["image_id", "captions"]].itertuples(index=False))
        train_caps = [list(by_id[i]) for i in train_ids]
        metrics, baselines, speed, generated = evaluate_captioning(
            model, cfg, inputs.array[:n], captions, ids, paths, train_feats, train_caps, device, ecfg.batch_size,
            ecfg.picture_images, picture, tcfg.seed, ecfg.decodings)
    speed["peak_memory_mb"] = peak_memory_mb(device)
    result = {"variant": name, "family": cfg.family, "model": cfg.model, "split": "test", "images": n,
              "captions": sum(map(len, captions)), "metrics": metrics, **baselines, "speed": speed,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "params": meta["params"],
              "selection": meta.get("selection"),  # the dev evaluation that picked this model (train stage)
              "baselines_from": "the variant's training split" if cfg.family == "captioning" else "this test split",
              **(extra or {})}
    if cfg.family == "alignment" and cfg.reranker.top_k:
        result["rerank_top_k"] = cfg.reranker.top_k
    if cfg.family == "alignment" and pixels:
        result["test_time_flip"] = ecfg.test_time_flip  # which image embeddings the metrics (and the search index) are of
    if generated is not None:
        io.write_json(Path(metrics_dir) / f"{name}_captions.json", generated)
    io.write_json(Path(metrics_dir) / f"{name}.json", result)
    return result, paths, search_index


def mlflow_test_metrics(result: dict) -> dict[str, float]:
    """A result's numbers under their MLflow names: ``test_<metric>`` (``@`` -> ``_at_``), the speed,
    and ``test_<decoding>_<metric>`` for each decoding a captioner was scored with."""
    numeric = {f"test_{k}".replace("@", "_at_"): v for k, v in result["metrics"].items() if isinstance(v, float)}
    numeric.update({f"test_{k}": v for k, v in result["speed"].items()})
    for dname, vals in result.get("decodings", {}).items():
        numeric.update({f"test_{dname}_{k}": v for k, v in vals.items() if isinstance(v, float)})
    return numeric
