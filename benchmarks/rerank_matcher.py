"""Dev-split experiment: what a trained re-ranker adds to its own first stage, per direction (#13).

    python benchmarks/rerank_matcher.py models/clip_lite2_minilm_rerank models/<other> \
        [--features data/features/efficientnet_lite2] [--splits data/splits] [--out rerank_matcher.json]
    python benchmarks/rerank_matcher.py --table rerank_matcher.json

For each trained dual encoder with a re-ranker (``reranker.kind`` fusion or scan, trained by
the train stage), on the dev split: i2t and t2i R@1 when each query's top-k (the variant's
``reranker.top_k``) is ordered by the dual encoder's logit plus w x the matching logit, for every
weight ``combine: dev`` chooses from (w = 0: the first stage alone), and by the matching logit
alone. The evaluate stage picks each direction's w on the same split (the best of each row); the
table shows how much the matcher adds to each direction and how it fares alone. The test split
stays the evaluate stage's.
"""
from __future__ import annotations

import argparse
import json

import torch


def table(res: dict) -> str:
    weights = res["weights"]
    head = ["model", "matcher", "direction"] + [f"w={w:g}" for w in weights] + ["matching alone"]
    lines = [f"Dev split ({res['dev_images']} images, {res['dev_captions']} captions); R@1 when each query's "
             "top-k is ordered by the dual encoder's logit + w x the matching logit (w=0: the first stage)", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in res["models"].items():
        for d in ("i2t", "t2i"):
            cells = [name, row["kind"], d] + [f"{row[d][str(w)]:.2f}" for w in weights] + [f"{row[d]['itm']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def measure(model_dir: str, features: str, splits: str, device) -> dict:
    """The evaluate stage's own dev choice (``scoring.rerank_candidates``, ``pick_rerank_weight``) with
    every weight's R@1 kept, plus the matching logit alone."""
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from vlbench.metrics.retrieval import retrieval_metrics
    from vlbench.models.reranker import reorder_top_k
    from vlbench.models.trained import load_trained
    from vlbench.scoring import pick_rerank_weight, rerank_candidates

    model, cfg, _ = load_trained(model_dir)
    model.to(device)
    inputs = open_inputs("val", splits, features, cfg)
    captions = captions_by_row(splits, "val", inputs.ids)
    sim, scores, owner = rerank_candidates(model, inputs, captions, device, 128)
    # the dual encoder's logit + w x the matching logit, whatever the variant's reranker.combine
    _, tried = pick_rerank_weight(sim, scores, owner, lambda w: lambda first, itm: model.scale() * first + w * itm)
    row = {"kind": cfg.reranker.kind, "top_k": cfg.reranker.top_k} | {d: {str(w): v for w, v in t.items()} for d, t in tried.items()}
    i2t, t2i = reorder_top_k(sim, scores, lambda first, itm: itm)
    row["i2t"]["itm"] = retrieval_metrics(i2t, owner)["i2t_R@1"]
    row["t2i"]["itm"] = retrieval_metrics(t2i, owner)["t2i_R@1"]
    return row | {"dev_images": len(captions), "dev_captions": len(owner)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="trained variants with a re-ranker (models/<variant>)")
    ap.add_argument("--features", default="data/features/efficientnet_lite2")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--table", help="print the table of a JSON written by --out, and stop")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(open(a.table).read())))
        return
    if not a.models:
        ap.error("name at least one trained model, or --table")
    from vlbench.models.reranker import DEV_WEIGHTS
    from vlbench.runtime import pick_device

    device = pick_device("auto")
    res = {"weights": list(DEV_WEIGHTS), "models": {}}
    for m in a.models:
        row = measure(m, a.features, a.splits, device)
        res["dev_images"], res["dev_captions"] = row.pop("dev_images"), row.pop("dev_captions")
        res["models"][m.rstrip("/").split("/")[-1]] = row
    print(table(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
