"""`vlbench search "a red circle on the left" --variant NAME`: the top images for a text query.

Indexes the test split's cached features (those of the variant's image encoder; for a pixel
variant, which tuned its encoder, the image files), prints path and score per hit, and optionally
writes a gallery PNG. The score is the cosine, or, where the evaluate stage chose query-bank
normalisation for the variant's t2i ranking on dev (``qb_beta_t2i`` > 0 in metrics/<variant>.json),
the normalised score the evaluation and the served search model rank by (``--raw``: the cosine).
A pixel variant evaluated with ``evaluate.test_time_flip`` embeds each image with its mirror image,
as its evaluation did.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("query", help="the text to search for")
    ap.add_argument("--variant", help="a trained alignment variant (reads models/<variant>)")
    ap.add_argument("--model", help="a trained model folder, or an MLflow model URI (models:/<variant>@champion, runs:/<id>/model), instead of --variant")
    ap.add_argument("--top", type=int, default=5, help="how many images (default 5)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to index")
    ap.add_argument("--features", help="features folder (default data/features/<image encoder>)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--gallery", help="write the hits as a PNG here")
    ap.add_argument("--raw", action="store_true", help="rank by cosine even where the evaluation chose query-bank normalisation")
    ap.add_argument("--params", default="params.yaml", help="params file (its evaluate.querybank_images and train.seed give the query bank)")
    ap.add_argument("--metrics", default="metrics", help="the evaluate stage's folder (<variant>.json: the chosen query-bank beta)")
    a = ap.parse_args(argv)
    if not (a.variant or a.model):
        ap.error("give --variant or --model")
    if a.top < 1:
        ap.error("--top must be at least 1")
    from ..data.manifests import read_manifest
    from ..image_features import load_features
    from ..inference import Searcher
    from ..inputs import check_features
    from ..runtime import configure_threads

    configure_threads()  # VLBENCH_JOBS: jobs sharing the cores
    s = Searcher.from_run(a.model, a.variant)
    if s.cfg.family != "alignment":
        ap.error(f"{a.variant or a.model} is a {s.cfg.family} variant; search needs an alignment variant")
    if s.meta.get("input") == "pixels":  # its image encoder was tuned: embed the image files themselves
        feats, paths = None, read_manifest(a.splits, a.split)["path"].tolist()
    else:
        features = a.features or f"data/features/{s.meta['image_encoder']}"
        trained = f"variants.{a.variant}" if a.variant else a.model
        check_features(features, s.meta["image_encoder"], f"{trained}.image_encoder", s.meta.get("image_size"),
                       f"{trained} (trained on features at image size)")
        feats, ids = load_features(features, a.split)
        paths = read_manifest(a.splits, a.split).set_index("image_id").loc[ids]["path"].tolist()
    evaluated = _evaluation(s, a)
    s.flip = bool(evaluated and evaluated.get("test_time_flip"))  # embed the images as the evaluation did
    s.index(feats, paths)
    if s.flip:
        import sys

        print("vlbench search: each image embedded with its mirror image, as the evaluation did (evaluate.test_time_flip)",
              file=sys.stderr)
    if evaluated and not a.raw:
        _querybank(s, a, evaluated, None if s.meta.get("input") == "pixels" else features)
    hits = s.search(a.query, a.top)
    for path, score in hits:
        print(f"{score:.4f}\t{path}")
    if a.gallery:
        from ..pictures import retrieval_gallery

        retrieval_gallery([a.query], [[(p, sc, False) for p, sc in hits]], a.gallery)
        print(f"gallery: {a.gallery}")


def _evaluation(s, a) -> dict | None:
    """The evaluate stage's result for this training of ``--variant`` (``<metrics>/<variant>.json``),
    None without one."""
    import json
    import sys

    if not a.variant:
        return None
    evaluated = Path(a.metrics) / f"{a.variant}.json"
    if not evaluated.is_file():
        return None
    result = json.loads(evaluated.read_text())
    if result.get("params") != s.meta.get("params"):
        print(f"vlbench search: {evaluated} scored another training of {a.variant}; ranking by cosine", file=sys.stderr)
        return None
    return result


def _querybank(s, a, result: dict, features: str | None) -> None:
    """Rank as the evaluate stage's t2i metrics did (``result``: ``_evaluation``): with query-bank
    normalisation where it chose it on dev, over the same bank (``vlbench.scoring.querybank_split``)."""
    import sys

    import torch

    from ..params import load_params, section
    from ..scoring import querybank_split, search_offsets

    beta = result.get("metrics", {}).get("qb_beta_t2i", 0.0)
    if not beta:
        return
    raw = load_params(a.params)
    n, seed = section(raw, "evaluate").querybank_images, section(raw, "train").seed
    if not n:
        print(f"vlbench search: {a.params} has no query bank (evaluate.querybank_images: 0); ranking by cosine", file=sys.stderr)
        return
    _, _, texts = querybank_split(s.cfg, a.splits, features, n, seed)
    bank = torch.cat([s.embed_texts(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    s.use_index(s.image_emb, s.paths, beta, search_offsets(bank, s.image_emb, beta))
    print(f"vlbench search: scores are query-bank normalised (beta {beta:g} over {len(texts)} training captions, "
          f"chosen on dev by the evaluation; --raw for cosines)", file=sys.stderr)
