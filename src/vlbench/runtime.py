"""Device choice, seeding and image loading shared by the stages."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal

import numpy as np
import torch
from PIL import Image, ImageOps


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def load_image(path: str, size: int) -> Image.Image:
    """Open any image as RGB, EXIF orientation applied, resized to size x size."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        return im.resize((size, size), Image.BICUBIC)


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
