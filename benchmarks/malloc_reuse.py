"""glibc's default malloc vs keeping freed memory for reuse (``runtime.configure_malloc``), on the
pipeline's CPU work.

    python benchmarks/malloc_reuse.py [--steps 5] [--rounds 2] [--only features grid_transformer ...]

glibc returns every freed block above its mmap threshold (at most 32 MB) to the OS, so a step's
large tensors are fresh mappings whose pages fault in again at every step. ``configure_malloc``
(called by ``configure_threads``, so by every stage) raises the thresholds to 1 GiB. malloc
settings belong to a process and the adaptive default cannot be restored once changed, so each
measurement is a child process (``VLBENCH_MALLOC=default`` for glibc's own); the two settings
alternate round by round. Each child builds its workload with the pipeline's own models on
synthetic inputs of the Flickr8k configuration's shapes (configs/flickr8k.yaml: EfficientNet-Lite2
at 260 px, 9x9 grids of 1280), runs one warm-up step and times ``--steps`` steps. Prints seconds
per step, minor page faults per step and the speed-up of reuse over the default.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = (81, 1280)  # Lite2's 9x9 grid at 260 px


def _captions(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = "a dog man woman child runs jumps sits on in the grass water street red blue black white ball shirt".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 14))) for _ in range(n)]


def _captioner(name: str):
    """A captioner of configs/flickr8k.yaml, its training step under bf16 autocast as the config trains it."""
    import torch
    import yaml

    from vlbench.models.variants import build_variant, create_variant_model, prepare_variant

    params = yaml.safe_load((ROOT / "configs/flickr8k.yaml").read_text())["variants"][name]
    cfg = build_variant(name, params)
    caps = _captions(2000)
    model = create_variant_model(cfg, GRID[1], GRID[0], prepare_variant(cfg, caps).get("vocab")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = cfg.optim.batch_size
    grid = torch.randn(batch, *GRID)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(grid, caps[:batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _features():
    """The features stage's forward: 16 images (features.batch_size) through Lite2, channels-last."""
    import torch

    from vlbench.models.registry import create_image_encoder

    enc = create_image_encoder("efficientnet_lite2").eval().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 260, 260).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode():
            enc(x)
    return step


def _image_top():
    """``image_tuning: top``: Lite2's last stage + head conv, forward and backward on 128 cached maps."""
    import torch

    from vlbench.models.registry import create_image_encoder

    enc = create_image_encoder("efficientnet_lite2").eval().requires_grad_(False).to(memory_format=torch.channels_last)
    _, top = enc.split_top(1)
    top.requires_grad_(True)
    maps = torch.randn(128, 208, 9, 9).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = top(maps)
        out.float().mean().backward()
    return step


WORKLOADS = {
    "features": ("features stage: Lite2 forward, 16 images at 260 px", _features),
    "image_top": ("train: image_tuning top step, 128 maps, bf16", _image_top),
    "grid_transformer": ("train: grid_transformer step, batch 32, bf16", lambda: _captioner("grid_transformer")),
    "prefix_smollm2": ("train: prefix_smollm2 step (frozen SmolLM2-135M), batch 16, bf16", lambda: _captioner("prefix_smollm2")),
}


def child(workload: str, steps: int) -> None:
    from vlbench.runtime import configure_threads

    threads = configure_threads()
    step = WORKLOADS[workload][1]()
    step()  # warm-up
    faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    print(json.dumps({"seconds": seconds, "faults": faults, "threads": threads}))


def measure(workload: str, mode: str, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLBENCH_MALLOC", None)
    if mode == "default":
        env["VLBENCH_MALLOC"] = "default"
    r = subprocess.run([sys.executable, __file__, "--child", workload, "--steps", str(steps)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--child", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, a.steps)
    runs = {w: {"default": [], "reuse": []} for w in a.only}
    for r in range(a.rounds):
        for w in a.only:
            for mode in (("default", "reuse") if r % 2 == 0 else ("reuse", "default")):
                runs[w][mode].append(measure(w, mode, a.steps))
                print(f"round {r + 1}, {w}, {mode}: {runs[w][mode][-1]['seconds']:.3f} s/step", file=sys.stderr)
    threads = runs[a.only[0]]["reuse"][0]["threads"]
    print(f"\n{a.steps} timed steps per process after one warm-up, {a.rounds} processes per setting "
          f"(median), {threads} threads\n")
    print("| workload | glibc default s/step | reuse s/step | speed-up | page faults/step, default | reuse |")
    print("|---|---|---|---|---|---|")
    for w, modes in runs.items():
        d, k = (statistics.median(x["seconds"] for x in modes[m]) for m in ("default", "reuse"))
        fd, fk = (statistics.median(x["faults"] for x in modes[m]) for m in ("default", "reuse"))
        print(f"| {WORKLOADS[w][0]} | {d:.3f} | {k:.3f} | {d / k:.2f}x | {fd:,.0f} | {fk:,.0f} |")


if __name__ == "__main__":
    main()
