"""Device choice and checks, CPU threads, seeding and image loading shared by the stages."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ParamError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def available_devices() -> list[str]:
    """The devices this process can use: cpu, cuda:0..N-1, mps."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def missing_device(name: str) -> str | None:
    """Why device ``name`` (auto, cpu, cuda, cuda:N, mps, mps:0) is not usable here, or None when it is."""
    if name in ("auto", "cpu"):
        return None
    kind, colon, index = name.partition(":")
    if kind not in ("cuda", "mps") or (colon and not index.isdigit()):
        return f"{name!r} is not auto, cpu, cuda[:N] or mps"
    have = available_devices()
    wanted = f"cuda:{int(index or 0)}" if kind == "cuda" else ("mps" if int(index or 0) == 0 else name)
    if wanted in have:
        return None
    return f"{name!r} is not available on this machine (available: {', '.join(have)})"


# glibc hands every freed block above its mmap threshold (adaptive, at most 32 MB) back to the
# OS, so each step's large tensors (a batch of 16 images at 260 px: 35 MB in Lite2's first stage)
# are fresh mappings whose pages fault in again, on every step: on these 2 cores the page faults
# cost more than the convolutions (benchmarks/malloc_reuse.py). With both thresholds raised to
# KEEP_FREED_BELOW, freed memory stays in the process for the next step; VLBENCH_MALLOC=default
# keeps glibc's behaviour.
KEEP_FREED_BELOW = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def configure_malloc() -> bool:
    """Let glibc keep freed memory below ``KEEP_FREED_BELOW`` for reuse instead of returning it to
    the OS (see above). No-op (False) off glibc, under ``VLBENCH_MALLOC=default``, or where the
    environment sets glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``."""
    import ctypes

    if os.environ.get("VLBENCH_MALLOC", "").strip() == "default" or any(
            os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BELOW))


_TORCH_DEFAULT_THREADS: int | None = None  # torch's own choice, before configure_threads changed it


def configure_threads(threads: int = 0) -> int:
    """Set torch's CPU threads for this process and return the count (called by every torch-using
    stage and command before any work); also ``configure_malloc``.

    ``OMP_NUM_THREADS`` set in the environment wins (torch has read it already; left alone).
    Else ``threads`` > 0 (params ``train.threads``) is used as given. Else (auto) the cores this
    process may use (``os.sched_getaffinity``; at most torch's default, which counts physical
    cores) divided by ``VLBENCH_JOBS``, the number of jobs sharing them (default 1), at least 1:
    two jobs on two cores each take one thread, not two threads each that spin against each other
    (``benchmarks/concurrent_jobs.py``)."""
    global _TORCH_DEFAULT_THREADS
    configure_malloc()  # and freed memory is reused, from the first step on
    if _TORCH_DEFAULT_THREADS is None:
        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    if threads <= 0:
        raw = os.environ.get("VLBENCH_JOBS", "").strip() or "1"
        try:
            jobs = int(raw)
        except ValueError:
            jobs = 0
        if jobs < 1:
            raise ParamError(f"VLBENCH_JOBS: expected the number of concurrent jobs (an integer >= 1), got {raw!r}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, min(cores, _TORCH_DEFAULT_THREADS) // jobs)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(*parts) -> str:
    """A stable hash of the settings a resumable artefact was made under."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fault_point(count: int) -> None:
    """Fault injection for the resume tests: with VLBENCH_FAULT=KILL@N (or TERM@N) the process
    sends itself that signal when ``count`` reaches N. Does nothing when the variable is unset."""
    sig, _, at = os.environ.get("VLBENCH_FAULT", "@-1").partition("@")
    if count == int(at):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


def load_image(path: str, size: int | None = None) -> Image.Image:
    """Open any image as 8-bit RGB with its EXIF orientation applied, resized to size x size
    when ``size`` is given. The download stage calls it on every image, so whatever passes
    there also loads here.

    Real photo folders hold more than RGB JPEGs, and a bare ``convert("RGB")`` gets some of
    them wrong: 16-bit greyscale ('I;16', or 'I' from 16-bit sources) would be clipped to white
    instead of scaled, and transparent pixels would turn black; they go onto white here.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max() > 255):
            scaled = np.rint(np.asarray(im, dtype=np.float64) / 257.0)  # 65535 -> 255
            im = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
        elif im.mode in ("I", "F"):
            im = Image.fromarray(np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = im.convert("RGB")
        return im if size is None else im.resize((size, size), Image.BICUBIC)


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
