"""Train and eval presets (as torchvision's references/classification/presets.py), in PIL and numpy only.

Each preset takes a lazily opened PIL image and returns an HxWx3 uint8 array. Both ask libjpeg for a
reduced-size decode (DCT scaling, `Image.draft`) whenever the output is smaller than the region it comes
from, which skips most of the decoding work for full-size ImageNet photos.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _decode_region(img: Image.Image, box: tuple[float, float, float, float], out_w: int, out_h: int) -> Image.Image:
    """Crop `box` (x0, y0, x1, y1 in full-size pixels) out of `img` and resize it to out_w x out_h."""
    full_w, full_h = img.size
    x0, y0, x1, y1 = box
    # Ask for the smallest decode that still keeps the box at least as large as the output.
    need_w = math.ceil(full_w * out_w / max(x1 - x0, 1e-6))
    need_h = math.ceil(full_h * out_h / max(y1 - y0, 1e-6))
    if need_w < full_w and need_h < full_h:
        img.draft("RGB", (need_w, need_h))
    if img.mode != "RGB":
        img = img.convert("RGB")  # grayscale, CMYK, palette and alpha images
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    scaled = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    return img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=scaled)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: 10 tries at a random area and aspect, then a centre crop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def color_jitter(pixels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation, each by a factor drawn from [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3)
    x = pixels.astype(np.float32) * brightness
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - gray.mean()) * contrast + gray.mean()
    gray = gray * contrast + gray.mean() * (1 - contrast)
    x = gray[..., None] + (x - gray[..., None]) * saturation
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class TrainPreset:
    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        jitter: float = 0.0,
    ):
        self.size, self.scale, self.ratio, self.hflip, self.jitter = size, tuple(scale), tuple(ratio), hflip, jitter

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        box = random_resized_crop_box(*img.size, self.scale, self.ratio, rng)
        out = _decode_region(img, box, self.size, self.size)
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(out)
        if self.jitter > 0:
            pixels = color_jitter(pixels, self.jitter, rng)
        return pixels


class EvalPreset:
    """Resize the short side to size / crop_ratio, then take the centre size x size crop, in one resample."""

    def __init__(self, size: int = 224, crop_ratio: float = 0.875):
        self.size, self.crop_ratio = size, crop_ratio

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        width, height = img.size
        side = min(width, height) * self.crop_ratio  # the crop's side in full-size pixels
        x0, y0 = (width - side) / 2, (height - side) / 2
        return np.asarray(_decode_region(img, (x0, y0, x0 + side, y0 + side), self.size, self.size))
