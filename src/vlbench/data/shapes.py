"""The embedded default dataset: procedurally drawn scenes with compositional captions.

Each image holds 1-3 objects, each a (size, colour, shape) placed in a cell of a 3x3 grid, on a
noisy background. Five captions per image describe the same scene in different phrasings
(positions, counts, sizes, background), so retrieval must bind colour to shape and position,
and a captioner must learn a small but real grammar. Everything follows from the seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
}
SHAPES = ["circle", "square", "triangle", "star"]
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "black": (25, 25, 25)}
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "centre", "right"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str  # small | large
    row: int
    col: int

    @property
    def position(self) -> str:
        r, c = ROWS[self.row], COLS[self.col]
        if r == "middle" and c == "centre":
            return "in the centre"
        if r == "middle":
            return f"on the {c}"
        if c == "centre":
            return f"at the {r}"
        return f"at the {r} {c}"


def sample_scene(rng: random.Random) -> tuple[str, list[SceneObject]]:
    n = rng.choice([1, 2, 2, 3])
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = []
    for r, c in cells:
        # Repeat a previous (colour, shape) now and then so counting phrases appear.
        if objects and rng.random() < 0.3:
            prev = rng.choice(objects)
            colour, shape = prev.colour, prev.shape
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        objects.append(SceneObject(colour, shape, rng.choice(["small", "large"]), r, c))
    return rng.choice(list(BACKGROUNDS)), objects


def _star(cx, cy, r):
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_scene(background: str, objects: list[SceneObject], size: int, rng: random.Random) -> Image.Image:
    base = np.full((size, size, 3), BACKGROUNDS[background], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 8, base.shape)
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in objects:
        r = cell * (0.42 if o.size == "large" else 0.24)
        cx = (o.col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (o.row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        jitter = np.array(COLOURS[o.colour]) + np.random.default_rng(rng.getrandbits(32)).integers(-15, 16, 3)
        fill = tuple(int(v) for v in np.clip(jitter, 0, 255))
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:
            draw.polygon(_star(cx, cy, r), fill=fill)
    return img


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str) -> str:
    return shape + "s"


def _counted(objects: list[SceneObject]) -> list[str]:
    """'two red circles', 'a blue star' in first-seen order."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    out = []
    for (colour, shape), k in groups.items():
        out.append(_a(f"{colour} {shape}") if k == 1 else f"{NUMBER_WORDS[k]} {colour} {_plural(shape)}")
    return out


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(background: str, objects: list[SceneObject], rng: random.Random) -> list[str]:
    shuffled = objects[:]
    rng.shuffle(shuffled)
    n = len(objects)
    shape_word = "shape" if n == 1 else "shapes"
    caps = [
        _join([f"a {o.size} {o.colour} {o.shape} {o.position}" for o in objects]),
        _join([_a(f"{o.colour} {o.shape} {o.position}") for o in shuffled]),
        f"{_join(_counted(objects))} on a {background} background",
        f"{NUMBER_WORDS[n]} {shape_word} : {_join([f'{o.colour} {o.shape}' for o in shuffled])}",
        f"a picture of {_join([f'a {o.size} {o.colour} {o.shape}' for o in shuffled])}",
    ]
    return caps


def generate(n_images: int, image_size: int, seed: int):
    """Yield (file_name, PIL image, 5 captions) deterministically from the seed."""
    rng = random.Random(seed)
    for i in range(n_images):
        background, objects = sample_scene(rng)
        img = draw_scene(background, objects, image_size, rng)
        yield f"shapes_{i:05d}.jpg", img, captions_for(background, objects, rng)
