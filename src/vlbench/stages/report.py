"""Stage `report`: one comparison table ``metrics/summary.md`` (every variant next to chance, and
next to its scores on other datasets: ``metrics/transfer/<label>/<variant>.json`` of the transfer
stage) and ``metrics/curves.png`` (training loss of every variant)."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .. import io
from ..params import load_params, variant_names

RETRIEVAL_COLS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_median_rank", "t2i_median_rank"]
CAPTION_COLS = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "distinct_captions", "trigram_repeat"]
DECODING_COLS = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "distinct_captions", "trigram_repeat"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return "n/a" if v.startswith("unavailable") else v
    return f"{v:.1f}"


def _count(result: dict) -> str:
    n = result.get("trainable_params")
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _table(cols: list[str], rows: list[tuple[str, dict, str]], speed_title: str = "speed") -> list[str]:
    out = ["| variant | " + " | ".join(cols) + f" | {speed_title} | peak MB | trainable params |", "|---" * (len(cols) + 4) + "|"]
    for name, vals, speed, mem, n in rows:
        out.append(f"| {name} | " + " | ".join(_fmt(vals.get(c)) for c in cols) + f" | {speed} | {mem} | {n} |")
    return out


def _is_cls_frozen_reference(r: dict) -> bool:
    p = r.get("params", {})
    return p.get("text_pooling") == "cls" and p.get("text_tuning", "frozen") == "frozen" and not p.get("reranker", {}).get("top_k")


def _against_references(align: list[dict]) -> list[str]:
    """Every alignment variant against the two references of the issue: the zero-training random
    projections and the plain dual encoder with CLS pooling and frozen encoders."""
    ref = next((r for r in align if _is_cls_frozen_reference(r)), None)
    head = "| variant | rsum | vs random projections |" + (f" vs {ref['variant']} (CLS, frozen) |" if ref else "")
    out = ["rsum = sum of the six R@K; differences in points.", "", head, "|---" * (3 + bool(ref)) + "|"]
    for r in align:
        entries = [(r["variant"], r["metrics"]["rsum"])]
        if "reranked_rsum" in r["metrics"]:
            entries.append((f"{r['variant']} (re-ranked)", r["metrics"]["reranked_rsum"]))
        if "qb_rsum" in r["metrics"]:
            entries.append((f"{r['variant']} (query-bank normalised)", r["metrics"]["qb_rsum"]))
        for name, rsum in entries:
            row = f"| {name} | {rsum:.1f} | {rsum - r['random_projection']['rsum']:+.1f} |"
            if ref:
                row += f" {rsum - ref['metrics']['rsum']:+.1f} |"
            out.append(row)
    return out


def _decodings(caps: list[dict]) -> list[str]:
    """Every captioner under each decoding its evaluation scored (metrics/<variant>.json ``decodings``);
    the configured one gives the headline numbers, the best CIDEr is in bold."""
    caps = [r for r in caps if r.get("decodings")]
    if not caps:
        return []
    out = ["## Captioning: decodings side by side", "",
           "| variant | decoding | " + " | ".join(DECODING_COLS) + " | speed |", "|---" * (len(DECODING_COLS) + 3) + "|"]
    wins = []
    for r in caps:
        table = r["decodings"]
        best = max(table, key=lambda d: table[d]["CIDEr"])
        for d, vals in table.items():
            label = d + (" (configured)" if d == r.get("decoding") else "")
            label = f"**{label}**" if d == best else label
            out.append(f"| {r['variant']} | {label} | " + " | ".join(_fmt(vals.get(c)) for c in DECODING_COLS)
                       + f" | {vals['captions_per_s']:.1f} cap/s |")
        wins.append(f"{r['variant']}: {best}" + ("" if best == r.get("decoding") else f" (configured: {r.get('decoding')})"))
    return out + ["", f"Best decoding by CIDEr: {'; '.join(wins)}.", ""]


def _selection(results: list[dict]) -> list[str]:
    """The step each variant's model comes from: its best dev evaluation during training."""
    rows = [r for r in results if r.get("selection")]
    if not rows:
        return []
    out = ["## Model selection (dev split)", "",
           "| variant | selected on | selected step | steps trained | dev value | evaluations |", "|---" * 6 + "|"]
    for r in rows:
        s = r["selection"]
        trained = f"{s['steps_trained']} of {s['steps']} (early stop)" if s["stopped_early"] else str(s["steps_trained"])
        if s.get("scst_steps"):  # the SCST phase's steps follow the cross-entropy ones
            scst = s["scst_steps_trained"]
            trained += f" + {scst} SCST" + (f" of {s['scst_steps']} (early stop)" if scst < s["scst_steps"] else "")
        out.append(f"| {r['variant']} | dev {s['metric']} | {s['step']} | {trained} | {s['value']:.3f} | {s['evaluations']} |")
    return out + ["", "Each model is the weights of its best dev evaluation (train.eval_every), not of its last step.", ""]


TRANSFER_COLS = {"alignment": ["rsum", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"],
                 "captioning": ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]}
TRANSFER_BASELINES = {"alignment": [("random_projection", "*random projections*"), ("chance", "*chance*")],
                      "captioning": [("nearest_neighbour", "*nearest neighbour* (in-domain training captions)"),
                                     ("chance", "*chance* (random in-domain training caption)")]}


def _metric(vals: dict | None, m: str):
    if vals is None:
        return None
    if m == "rsum" and "rsum" not in vals and any("_R@" in k for k in vals):  # chance has no rsum of its own
        return sum(v for k, v in vals.items() if "_R@" in k)
    return vals.get(m)


def read_transfer(metrics_dir: Path, variants: list[str]) -> dict[str, dict[str, dict]]:
    """label -> variant -> the transfer stage's result, for the variants of params.yaml."""
    folder = Path(metrics_dir) / "transfer"
    found = {}
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        by_variant = {v: json.loads((d / f"{v}.json").read_text()) for v in variants if (d / f"{v}.json").is_file()}
        if d.is_dir() and by_variant:
            found[d.name] = by_variant
    return found


def _transfer(results: list[dict], transfer: dict[str, dict[str, dict]]) -> list[str]:
    """Each variant's headline metrics in-domain and on every other dataset's test split."""
    if not transfer:
        return []
    labels = list(transfer)
    out = ["## Transfer: the same models on other datasets' test splits", ""]
    for label, by_variant in transfer.items():
        r = next(iter(by_variant.values()))
        t = r.get("transfer", {})
        out.append(f"- **{label}**: {r['images']} test images, {r['captions']} captions ({t.get('dataset', '?')}, "
                   f"layout {t.get('layout', '?')}, split: {t.get('split_source', '?')}; {t.get('root', '')})")
    out += ["", "| variant | metric | in-domain | " + " | ".join(labels) + " |", "|---" * (3 + len(labels)) + "|"]
    for family in ("alignment", "captioning"):
        fam = [r for r in results if r["family"] == family]
        if not fam:
            continue
        for r in fam:
            for m in TRANSFER_COLS[family]:
                cells = [_fmt(_metric(r["metrics"], m))]
                cells += [_fmt(_metric(transfer[lb].get(r["variant"], {}).get("metrics"), m)) for lb in labels]
                out.append(f"| {r['variant']} | {m} | " + " | ".join(cells) + " |")
        for key, title in TRANSFER_BASELINES[family]:
            firsts = [next((x for x in transfer[lb].values() if x["family"] == family), None) for lb in labels]
            for m in TRANSFER_COLS[family]:
                cells = [_fmt(_metric(fam[0].get(key), m))]
                cells += [_fmt(_metric(x.get(key) if x else None, m)) for x in firsts]
                out.append(f"| {title} | {m} | " + " | ".join(cells) + " |")
    return out + ["", "Same metrics as above (R@K and rsum in %, caption scores x100); `-`: not scored there. "
                  "Captioning baselines on another dataset use the in-domain training split (the variants' own).", ""]


def summarise(results: list[dict], transfer: dict[str, dict[str, dict]] | None = None) -> str:
    lines = ["# Results", ""]
    align = [r for r in results if r["family"] == "alignment"]
    caps = [r for r in results if r["family"] == "captioning"]
    if align:
        r0 = align[0]
        lines += [f"## Retrieval (test split: {r0['images']} images, {r0['captions']} captions, captions grouped per image)", ""]
        rows = []
        for r in align:
            speed, mem = r["speed"], f"{r['speed']['peak_memory_mb']:.0f}"
            flip = " (test-time flip)" if r.get("test_time_flip") else ""  # evaluate.test_time_flip (pixel variants)
            rows.append((r["variant"] + flip, r["metrics"], f"{speed['ms_per_1000_queries']:.0f} ms", mem, _count(r)))
            if "reranked_rsum" in r["metrics"]:
                reranked = {k.removeprefix("reranked_"): v for k, v in r["metrics"].items() if k.startswith("reranked_")}
                k = r.get("rerank_top_k", "k")
                m = r["metrics"]
                how = (f" (matching weight i2t {m['rerank_weight_i2t']:g} / t2i {m['rerank_weight_t2i']:g}, chosen on dev)"
                       if "rerank_weight_i2t" in m else "")
                rows.append((f"{r['variant']} + cross-attention re-rank of top-{k}{how}", reranked,
                             f"+{speed['rerank_ms_per_1000_queries']:.0f} ms", mem, ""))
            if "qb_rsum" in r["metrics"]:
                m = r["metrics"]
                qb = {k.removeprefix("qb_"): v for k, v in m.items() if k.startswith("qb_") and not k.startswith("qb_beta")}
                rows.append((f"{r['variant']} + query-bank normalisation (beta i2t {m['qb_beta_i2t']:g} / t2i "
                             f"{m['qb_beta_t2i']:g}, chosen on dev; 0 = raw scores)", qb, "", mem, ""))
        rows.append(("*random projections* (pretrained features, no training)", r0["random_projection"], "", "", ""))
        rows.append(("*chance*", r0["chance"], "", "", ""))
        lines += _table(RETRIEVAL_COLS, rows, speed_title="time / 1000 queries") + [""]
        lines += ["R@K in %, higher is better; median rank: lower is better. i2t: an image is a hit when any of its "
                  "captions is in the top K. Time: embedding both sides and scoring, per 1000 queries (images + captions)."
                  + (" Test-time flip: each image embedded as the mean of its and its mirror image's embeddings."
                     if any(r.get("test_time_flip") for r in align) else ""), ""]
        lines += _against_references(align) + [""]
    if caps:
        r0 = caps[0]
        lines += [f"## Captioning (test split: {r0['images']} images, pycocoevalcap)", ""]
        rows = [(r["variant"], r["metrics"], f"{r['speed']['captions_per_s']:.1f} cap/s", f"{r['speed']['peak_memory_mb']:.0f}",
                 _count(r)) for r in caps]
        rows.append(("*nearest neighbour* (caption of the closest training image)", r0["nearest_neighbour"], "", "", ""))
        rows.append(("*chance* (random training caption)", r0["chance"], "", "", ""))
        if "references" in r0:  # diversity only: the first human reference of each test image
            rows.append(("*human references* (first reference per image)", r0["references"], "", "", ""))
        lines += _table(CAPTION_COLS, rows) + [""]
        nn = r0["nearest_neighbour"]
        beat = [r["variant"] for r in caps if r["metrics"]["CIDEr"] > nn["CIDEr"] and r["metrics"]["BLEU-4"] > nn["BLEU-4"]]
        lines += ["Scores x100. SPICE shows n/a when its Stanford CoreNLP models are not installed.",
                  f"Beat the nearest-neighbour baseline on both CIDEr and BLEU-4: {', '.join(beat) or 'none'}.",
                  "distinct_captions: distinct captions per 1,000 test images; trigram_repeat: % of captions in which "
                  "some word trigram occurs twice (lower is more fluent).", ""]
        lines += _decodings(caps)
    lines += _transfer(results, transfer or {})
    lines += _selection(results)
    lines += ["## Reproducibility", "",
              "Same params and seed give the same numbers on CPU (training resumed from a checkpoint included). "
              "On a GPU, identical numbers additionally need `torch.use_deterministic_algorithms(True)` and "
              "`CUBLAS_WORKSPACE_CONFIG=:4096:8`, which are off by default because they cost speed.", ""]
    return "\n".join(lines)


def run(params_path: str, metrics_dir: str) -> None:
    variants = variant_names(load_params(params_path))
    metrics_dir = Path(metrics_dir)
    missing = [v for v in variants if not (metrics_dir / f"{v}.json").is_file()]
    if missing:
        raise SystemExit(f"vlbench report: no metrics for {', '.join(missing)} (run their evaluate stage first)")
    results = [json.loads((metrics_dir / f"{v}.json").read_text()) for v in variants]
    io.write_text(metrics_dir / "summary.md", summarise(results, read_transfer(metrics_dir, variants)))
    curves = {}
    for v in variants:
        f = metrics_dir / "curves" / f"{v}.csv"
        if f.is_file():
            with open(f) as fh:
                curves[v] = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh) if r["loss"]]  # SCST rows: no loss
    from ..pictures import training_curves

    with io.atomic_path(metrics_dir / "curves.png") as tmp:
        training_curves(curves, str(tmp) + ".png")
        Path(str(tmp) + ".png").replace(tmp)
    print((metrics_dir / "summary.md").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench report", description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (reads the list of variants)")
    ap.add_argument("--metrics", default="metrics", help="folder with <variant>.json and curves/")
    a = ap.parse_args(argv)
    run(a.params, a.metrics)
