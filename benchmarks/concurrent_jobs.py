"""Concurrent training jobs on one CPU: torch's default thread count vs threads split between jobs
(issue 12, item 5).

    python benchmarks/concurrent_jobs.py [--jobs 1 2] [--seconds 30] [--repeats 2] [--variant grid_transformer]

For each number of jobs N it starts N processes at once (what `dvc queue start -j N` does), each
running the real training step of one variant from `params.yaml` (the default: the grid
transformer, on random token grids of the Lite0 feature shape, batch and sizes from the params)
for the same wall-clock window, and reports the median wall seconds per step of each process and
the CPU seconds (all its threads) per step:

* ``default``: torch's own thread count (every process takes every core);
* ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep, not spin);
* ``split``: each process gets cores/N threads (``OMP_NUM_THREADS`` and ``torch.set_num_threads``,
  what ``VLBENCH_JOBS=N`` makes ``vlbench.runtime.configure_threads`` do);
* ``one`` (N=1 only): one thread, for reference.

The processes build their model and warm up first, then all start timing at the same moment and
stop after ``--seconds``, so the timed windows overlap (up to the last step of each).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(variant: str, seconds: float) -> None:
    """One job: build the variant, warm up, wait for the common start, time steps for ``seconds``."""
    import torch
    import yaml

    from vlbench.models.registry import create_image_encoder
    from vlbench.models.variants import build_variant, create_variant_model, prepare_variant
    from vlbench.params import section
    from vlbench.training import lr_at

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = build_variant(variant, raw["variants"][variant])
    size = section(raw, "features").image_size
    torch.manual_seed(0)
    with torch.no_grad():
        grid = create_image_encoder(cfg.image_encoder).eval()(torch.zeros(1, 3, size, size))
    n_grid, dim = grid.shape[1], grid.shape[2]
    words = "a large small red green blue yellow purple orange circle square triangle star at the top left right centre".split()
    g = torch.Generator().manual_seed(0)
    captions = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g).tolist()) for _ in range(256)]
    vocab = prepare_variant(cfg, captions).get("vocab")
    model = create_variant_model(cfg, dim, n_grid, vocab).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.optim.lr)
    bs = cfg.optim.batch_size
    feats = torch.randn(256, n_grid, dim, generator=g)

    def step(k: int) -> None:
        for group in optim.param_groups:
            group["lr"] = lr_at(k, cfg.optim)
        idx = torch.randint(len(feats), (bs,), generator=g)
        loss = model.loss(feats[idx], [captions[i] for i in idx.tolist()])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()

    for k in range(3):  # warm-up: allocator, OpenMP pool
        step(k)
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())  # the same moment for every job
    time.sleep(max(0.0, start_at - time.time()))
    times, end, k = [], start_at + seconds, 3
    cpu0 = time.process_time()
    while time.time() < end:
        t0 = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - t0)
        k += 1
    cpu = (time.process_time() - cpu0) / len(times)  # CPU seconds of all this process's threads, per step
    print(json.dumps({"threads": torch.get_num_threads(), "steps": len(times), "median_s": statistics.median(times),
                      "mean_s": statistics.fmean(times), "max_s": max(times), "cpu_s": cpu}))


MODES = {
    "default": "torch's default threads",
    "passive": "default threads, OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)",
    "split": "cores/N threads per job (OMP_NUM_THREADS = what VLBENCH_JOBS=N gives)",
    "one": "1 thread (reference)",
}


def run_jobs(n: int, mode: str, variant: str, seconds: float, cores: int) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    for k in ("VLBENCH_JOBS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS"):
        env.pop(k, None)
    if mode == "split":
        env["OMP_NUM_THREADS"] = str(max(1, cores // n))
    elif mode == "one":
        env["OMP_NUM_THREADS"] = "1"
    elif mode == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", variant, str(seconds)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:  # every job has built its model and warmed up
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker failed with {p.wait()}")
    start_at = f"{time.time() + 0.5}\n"
    for p in procs:
        p.stdin.write(start_at)
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed with {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=30.0, help="timed window per configuration")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all configurations (interleaved)")
    ap.add_argument("--variant", default="grid_transformer", help="a key of `variants` in params.yaml")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    import torch

    print(f"{platform.machine()}, {cores} usable cores (os.sched_getaffinity), torch {torch.__version__}, "
          f"torch default threads {torch.get_num_threads()}; variant {a.variant}, {a.seconds:.0f} s windows, "
          f"{a.repeats} rounds", flush=True)
    configs = [(n, mode) for n in a.jobs for mode in (("default", "one") if n == 1 else ("default", "passive", "split"))]
    results: dict[tuple[int, str], list[dict]] = {c: [] for c in configs}
    for r in range(a.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:
            res = run_jobs(*c, a.variant, a.seconds, cores)
            results[c].extend(res)
            print(f"  round {r + 1} N={c[0]} {c[1]}: " + ", ".join(
                f"{x['median_s']:.3f} s/step, {x['cpu_s']:.3f} CPU s/step ({x['steps']} steps)" for x in res), flush=True)
    singles = [statistics.median(x["median_s"] for x in xs) for (n, _), xs in results.items() if n == 1]
    base = min(singles) if singles else None  # the faster single job: what one job alone can do
    print("".join(f"\n  {k}: {v}" for k, v in MODES.items()))
    print("\n| jobs N | threads per job | s/step of each job, each round | median s/step | vs faster single job | "
          "CPU s/step | jobs' steps/s together |")
    print("|---|---|---|---|---|---|---|")
    for (n, mode), xs in results.items():
        med = statistics.median(x["median_s"] for x in xs)
        each = ", ".join(f"{x['median_s']:.2f}" for x in xs)
        ratio = f"{med / base:.2f}x" if base else "-"
        cpu = statistics.median(x["cpu_s"] for x in xs)
        print(f"| {n} | {xs[0]['threads']} ({mode}) | {each} | {med:.3f} | {ratio} | {cpu:.3f} | {n / med:.2f} |")


if __name__ == "__main__":
    main()
