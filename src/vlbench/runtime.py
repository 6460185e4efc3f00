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
