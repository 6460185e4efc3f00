"""Dev-split experiment: test-time flip and query-bank size for a trained pixel dual encoder (#13).

    python benchmarks/test_time_flip.py --model models/clip_lite2_minilm_top4_imgtop --splits data/splits \
        [--banks 2000 4000 6000] [--flipped-bank 2000] [--out benchmarks/flickr8k/test_time_flip.json]
    python benchmarks/test_time_flip.py --table benchmarks/flickr8k/test_time_flip.json
    python benchmarks/test_time_flip.py --compare metrics_single metrics_flip   # evaluate-stage results, side by side

Rows: the dev images single-view, mirrored, and the normalised mean of both (what
``evaluate.test_time_flip`` scores); for each, raw R@1 both ways and query-bank normalised R@1 (the
best over the raw scores and the betas: ``vlbench.scoring.choose_beta``, the evaluate stage's choice) with banks of N training images, drawn
as the evaluate stage draws them (``vlbench.scoring.querybank_split``, ``train.seed`` 0), their
images single-view; the bank of ``--flipped-bank`` images is also tried with its images flipped and
averaged like the queries. Everything here is the dev split: it chooses settings; the test split is
the evaluate stage's. fp32, as the evaluate stage runs. Prints a table and writes it as JSON.
``--compare A B``: the test metrics of the variants both evaluate-stage folders hold (``vlbench
evaluate --metrics A``, then with other ``evaluate`` params into B), one row per variant and folder.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

BETAS = [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0]


def table(res: dict) -> str:
    banks = res["banks"]
    head = ["dev images", "raw i2t R@1", "raw t2i R@1"] + [f"bank {n}: i2t / t2i R@1 (betas)" for n in banks]
    if res.get("flipped_bank"):
        head.append(f"bank {res['flipped_bank']} flipped: i2t R@1 (beta)")
    lines = [f"{res['model']}; dev split ({res['dev_images']} images, {res['dev_captions']} captions); "
             f"query-bank betas {res['betas']}, the best per direction", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in res["rows"].items():
        cells = [name, f"{row['raw']['i2t']:.1f}", f"{row['raw']['t2i']:.1f}"]
        for n in banks:
            b = row["bank"][str(n)]
            cells.append(f"{b['i2t']:.1f} / {b['t2i']:.1f} ({b['beta_i2t']:g} / {b['beta_t2i']:g})")
        if res.get("flipped_bank"):
            f = row.get("flipped_bank")
            cells.append(f"{f['i2t']:.1f} ({f['beta_i2t']:g})" if f else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Image tower: {res['seconds_per_1000_images']:.1f} s per 1,000 images single-view "
                  f"(a flipped view costs the same again)."]
    return "\n".join(lines)


def compare(folders: list[str]) -> str:
    """Test R@1/R@5 raw and query-bank normalised of each variant in every folder, folder by folder."""
    from pathlib import Path

    cols = ["i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "rsum"]
    names = sorted(set.intersection(*({p.stem for p in Path(f).glob("*.json")} for f in folders)))
    lines = ["| variant | evaluate params | test_time_flip | " + " | ".join(cols) + " | query-bank: "
             + " | ".join(cols) + " | betas i2t / t2i | queries/s |", "|---" * (2 * len(cols) + 5) + "|"]
    for name in names:
        for f in folders:
            r = json.loads((Path(f) / f"{name}.json").read_text())
            m, flip = r["metrics"], r.get("test_time_flip")
            lines.append(f"| {name} | {Path(f).name} | {'n/a (cached grid)' if flip is None else flip} | "
                         + " | ".join(f"{m[c]:.1f}" for c in cols) + " | "
                         + " | ".join(f"{m['qb_' + c]:.1f}" for c in cols)
                         + f" | {m['qb_beta_i2t']:g} / {m['qb_beta_t2i']:g} | {r['speed']['queries_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained pixel dual encoder (models/<variant>)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--banks", type=int, nargs="+", default=[2000, 4000, 6000], help="query-bank sizes (training images)")
    ap.add_argument("--flipped-bank", type=int, default=2000, help="this bank also with its images flipped (0: not)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--table", help="print the table of a JSON written by --out, and stop")
    ap.add_argument("--compare", nargs="+", help="evaluate-stage metrics folders: print their test metrics side by side, and stop")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(open(a.table).read())))
        return
    if a.compare:
        print(compare(a.compare))
        return
    if not a.model:
        ap.error("give --model (or --table)")
    from vlbench.data.manifests import captions_by_row
    from vlbench.inputs import open_inputs
    from vlbench.metrics.retrieval import retrieval_metrics
    from vlbench.models.trained import load_trained
    from vlbench.runtime import configure_threads
    from vlbench.scoring import choose_beta, embed_image_batches, querybank_split
    from vlbench.training import encode_texts

    configure_threads()
    torch.set_grad_enabled(False)
    model, cfg, meta = load_trained(a.model)
    if meta.get("input") != "pixels":
        ap.error(f"{a.model} reads cached grids: test-time flip is for pixel variants")
    cpu = torch.device("cpu")

    def images(inputs, rows, flip: bool, mirror: bool = False):
        """``embed_image_batches`` (``flip``: as evaluate.test_time_flip); ``mirror``: of the mirror images."""
        rows = list(rows)
        batches = (inputs.batch(rows[s : s + a.batch_size]) for s in range(0, len(rows), a.batch_size))
        return embed_image_batches(model, (b.flip(-1) if mirror else b for b in batches), flip)

    def texts(captions, desc):
        return model.embed_text_features(encode_texts(model, captions, cpu, desc=desc)[0])

    dev = open_inputs("val", a.splits, None, cfg)
    caps = captions_by_row(a.splits, "val", dev.ids)
    owner = torch.tensor([i for i, c in enumerate(caps) for _ in c])
    txt = texts([c for cs in caps for c in cs], "dev captions")
    t0 = time.perf_counter()
    single = images(dev, range(len(dev)), False)
    seconds = (time.perf_counter() - t0) / len(dev) * 1000
    rows = {"single-view": single, "mirrored": images(dev, range(len(dev)), False, mirror=True),
            "mean of both (test_time_flip)": images(dev, range(len(dev)), True)}
    train = open_inputs("train", a.splits, None, cfg)
    everything = images(train, range(len(train)), False)  # each bank's images are rows of this
    banks = {}
    for n in a.banks:
        _, bank_rows, bank_caps = querybank_split(cfg, a.splits, None, n, 0)
        banks[n] = bank_rows, everything[bank_rows], texts(bank_caps, f"bank {n} captions")
    flipped = images(train, banks[a.flipped_bank][0], True) if a.flipped_bank else None
    res = {"model": a.model, "dev_images": len(dev), "dev_captions": len(owner), "betas": BETAS, "banks": a.banks,
           "flipped_bank": a.flipped_bank, "seconds_per_1000_images": seconds, "rows": {}}
    def best(sim, bank_img, bank_txt, img, direction):  # the evaluate stage's choice on dev: (R@1, beta)
        beta, tried = choose_beta(sim, bank_img, bank_txt, img, txt, owner, BETAS, direction)
        return tried[beta], beta

    for name, img in rows.items():
        sim = img @ txt.t()
        raw = retrieval_metrics(sim, owner)
        row = {"raw": {"i2t": raw["i2t_R@1"], "t2i": raw["t2i_R@1"]}, "bank": {}}
        for n, (_, bank_img, bank_txt) in banks.items():
            (i2t, bi), (t2i, bt) = best(sim, bank_img, bank_txt, img, "i2t"), best(sim, bank_img, bank_txt, img, "t2i")
            row["bank"][str(n)] = {"i2t": i2t, "t2i": t2i, "beta_i2t": bi, "beta_t2i": bt}
        if flipped is not None and name.startswith("mean"):
            i2t, bi = best(sim, flipped, banks[a.flipped_bank][2], img, "i2t")  # t2i's bank is captions: unchanged
            row["flipped_bank"] = {"i2t": i2t, "beta_i2t": bi}
        res["rows"][name] = row
    print(table(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
