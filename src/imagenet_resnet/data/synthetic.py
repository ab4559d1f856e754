"""A procedural image dataset in the ImageNet folder layout, for the demo and the tests.

Ten classes of shapes and textures drawn at random colours, sizes, positions and rotations over noisy
backgrounds: colour says nothing about the class, so a model has to learn shape.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "stripes", "checkerboard", "dots")


def _random_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and background colour far enough apart to see the shape."""
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        if np.abs(fg.astype(int) - bg.astype(int)).sum() > 180:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def draw_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    fg, bg = _random_colours(rng)
    noise = rng.normal(0, 12, size=(size, size, 3))
    img = Image.fromarray(np.clip(np.array(bg) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    name = CLASSES[label]
    r = rng.uniform(0.2, 0.34) * size  # the shape's radius
    cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
    tilt = rng.uniform(-0.3, 0.3)  # radians: a little rotation, never enough to turn a square into a diamond
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "ring":
        width = max(2, int(r * rng.uniform(0.25, 0.4)))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=width)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 4, math.pi / 4 + tilt), fill=fg)
    elif name == "diamond":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.8, r * 1.2, r * 0.8], tilt), fill=fg)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, -math.pi / 2 + tilt), fill=fg)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.5] * 5, -math.pi / 2 + tilt), fill=fg)
    elif name == "cross":
        arm = r * rng.uniform(0.28, 0.4)
        for angle in (tilt, tilt + math.pi / 2):
            dx, dy = math.cos(angle), math.sin(angle)
            px, py = -dy * arm, dx * arm
            draw.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                          (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fg)
    elif name == "stripes":
        period = rng.uniform(6, 12) * size / 64
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        mask = ((xx * math.cos(angle) + yy * math.sin(angle)) // (period / 2)) % 2 == 0
        return _paint(img, mask, fg)
    elif name == "checkerboard":
        cell = rng.uniform(5, 10) * size / 64
        yy, xx = np.mgrid[0:size, 0:size]
        mask = ((xx // cell + yy // cell) % 2) == 0
        return _paint(img, mask, fg)
    elif name == "dots":
        step = rng.uniform(9, 14) * size / 64
        dot = step * rng.uniform(0.2, 0.3)
        ox, oy = rng.uniform(0, step, size=2)
        for y in np.arange(oy - step, size + step, step):
            for x in np.arange(ox - step, size + step, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=fg)
    return img


def _paint(img: Image.Image, mask: np.ndarray, colour: tuple[int, ...]) -> Image.Image:
    pixels = np.array(img)
    pixels[mask] = colour
    return Image.fromarray(pixels)


def complete_stamp(out: str | Path, train_per_class: int = 400, val_per_class: int = 60, size: int = 64,
                   seed: int = 0) -> Path:
    """The file that marks a complete copy made with these arguments: make_shapes_dataset reuses one that has it."""
    return Path(out) / f".complete-{train_per_class}-{val_per_class}-{size}-{seed}"


def make_shapes_dataset(out: str | Path, train_per_class: int = 400, val_per_class: int = 60, size: int = 64,
                        seed: int = 0) -> Path:
    """Write out/train/<class>/*.jpg and out/val/<class>/*.jpg; skip if a complete copy is already there."""
    out = Path(out)
    stamp = complete_stamp(out, train_per_class, val_per_class, size, seed)
    if stamp.exists():
        return out
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        for label, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng((split_seed, label))
            for i in range(per_class):
                draw_image(label, size, rng).save(folder / f"{name}_{i:05d}.jpg", quality=92)
    stamp.touch()
    return out
