"""Train and eval presets (as torchvision's references/classification/presets.py), without torchvision.

Each preset takes an image's encoded bytes and returns an HxWx3 uint8 array. The work per image is kept to
the minimum: only the JPEG header is parsed to place the crop; the decode is asked for the smallest
power-of-two DCT scaling (libjpeg-turbo decodes 1/2, 1/4 or 1/8 of the size for a fraction of the cost)
that keeps the crop at least as large as the output; the crop is resized with PyTorch's uint8 bilinear
kernel, which is about twice as fast as PIL's. JPEGs go through simplejpeg (libjpeg-turbo, no Python
image object); PNG, CMYK and anything else it refuses go through PIL, which is shown only the formats
training reads (untrusted_images.py).

`data.pipeline` picks how the pixels are made, so that an accuracy A/B can rule out a loss in the fast path:
- `fast`: the above (reduced-size decode; fast IDCT and chroma upsampling for training);
- `full-decode`: the same crops and resizes from a full-size decode with the accurate IDCT;
- `reference`: what torchvision's reference scripts do: PIL decodes the whole file, then RandomResizedCrop +
  RandomHorizontalFlip for training, Resize + CenterCrop for evaluation, with torchvision's own functional
  transforms where torchvision imports, and the same steps written with PIL where it does not.
All three draw the same random numbers in the same order: at one seed they take the same crops and flips.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

from .untrusted_images import DATA_FORMATS, ImageRejected, check_pixels, open_untrusted

try:  # a small wheel that bundles libjpeg-turbo; optional so that any platform without it still works
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    simplejpeg = None

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in full-size pixels


def unreadable_reason(data: bytes, error: Exception) -> str:
    """Why an image could not be read, in the same words wherever it is found (prepare, training, evaluation)."""
    if not data:
        return "empty file (0 bytes)"
    if isinstance(error, ImageRejected):  # a format not read here, or too many pixels: its message says so
        return str(error)
    if "truncated" in str(error):
        return f"truncated ({error})"
    return f"{type(error).__name__}: {error}"


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; ImageRejected for a format training does not read or an image
    of too many pixels."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # not something libjpeg-turbo reads (e.g. CMYK): PIL will say
        else:
            check_pixels(width, height, DATA_FORMATS)
            return width, height
    with open_untrusted(data, DATA_FORMATS) as img:
        return img.size


def _scale_factor(width: int, height: int, box: Box, out_w: int, out_h: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps the box at least out_w x out_h after a reduced-size decode."""
    factor = 1
    while factor < 8 and (box[2] - box[0]) / (2 * factor) >= out_w and (box[3] - box[1]) / (2 * factor) >= out_h:
        factor *= 2
    return factor


def _decode(data: bytes, width: int, height: int, factor: int, fast: bool) -> np.ndarray:
    """HxWx3 uint8 pixels of the whole image, decoded at 1/factor of its size (rounded up)."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, "RGB", fastdct=fast, fastupsample=fast,
                                          min_height=-(-height // factor), min_width=-(-width // factor))
        except ValueError:
            pass  # CMYK, or a damaged file that PIL may read or report better
    with open_untrusted(data, DATA_FORMATS) as img:
        if factor > 1:
            img.draft("RGB", (-(-width // factor), -(-height // factor)))
        if img.mode != "RGB":
            img = img.convert("RGB")  # grayscale, CMYK, palette, 16-bit and alpha images
        return np.array(img)  # writable, as torch.from_numpy wants


def decode_region(data: bytes, size: tuple[int, int], box: Box, out_w: int, out_h: int, fast: bool = False,
                  flip: bool = False, scaled: bool = True) -> np.ndarray:
    """Crop `box` out of the image, resize it to out_w x out_h (bilinear, antialiased when shrinking) and
    optionally mirror it. The pixels stay channels-last throughout: PyTorch's uint8 resize kernel is fastest
    on that layout and its output is then HWC without a transpose. `scaled`: decode at a reduced size where
    the crop allows it; else always at full size."""
    width, height = size
    factor = _scale_factor(width, height, box, out_w, out_h) if scaled else 1
    pixels = _decode(data, width, height, factor, fast)
    sx, sy = pixels.shape[1] / width, pixels.shape[0] / height
    return resize_region(pixels, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), out_w, out_h, flip)


def resize_region(pixels: np.ndarray, box: Box, out_w: int, out_h: int, flip: bool = False) -> np.ndarray:
    """Crop `box` (in the coordinates of `pixels`, an HxWx3 uint8 array) and resize it as decode_region does."""
    # Integer bounds that contain the box; the sub-pixel remainder is dropped (under one decoded pixel).
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = max(x0 + 1, math.ceil(box[2])), max(y0 + 1, math.ceil(box[3]))
    crop = torch.from_numpy(pixels[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    crop = crop.contiguous(memory_format=torch.channels_last)
    if crop.shape[-2:] != (out_h, out_w):
        crop = torch.nn.functional.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True,
                                               align_corners=False)
    hwc = crop[0].permute(1, 2, 0)
    return (torch.flip(hwc, dims=[1]) if flip else hwc.contiguous()).numpy()


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng
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


def color_jitter(pixels: np.ndarray, strength: float, rng) -> np.ndarray:
    """Brightness, contrast and saturation, each by a factor drawn from [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = (rng.uniform(max(0.0, 1 - strength), 1 + strength) for _ in range(3))
    x = pixels.astype(np.float32) * brightness
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - gray.mean()) * contrast + gray.mean()
    gray = gray * contrast + gray.mean() * (1 - contrast)
    x = gray[..., None] + (x - gray[..., None]) * saturation
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def progressive_size(epoch: float, start_size: int, end_size: int, start_epoch: float, end_epoch: float) -> int:
    """FFCV's progressive resizing: start_size up to start_epoch, end_size from end_epoch, and in between
    the linear ramp rounded to a multiple of 32 (epochs counted from 0; a budget's stretch makes them fractional)."""
    if epoch <= start_epoch:
        return start_size
    if epoch >= end_epoch:
        return end_size
    ramp = start_size + (end_size - start_size) * (epoch - start_epoch) / (end_epoch - start_epoch)
    return int(round(ramp / 32)) * 32


class TrainPreset:
    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        jitter: float = 0.0,
        full_decode: bool = False,
    ):
        """`full_decode`: no reduced-size decode and the accurate IDCT (the `full-decode` pipeline)."""
        self.size, self.scale, self.ratio, self.hflip, self.jitter = size, tuple(scale), tuple(ratio), hflip, jitter
        self.full_decode = full_decode

    def __call__(self, data: bytes, rng, side: int = 0) -> np.ndarray:
        """`rng`: numpy's Generator or loader.SampleRandom (uniform, integers, random). `side`: this epoch's
        crop side under progressive resizing; 0 = `size`."""
        side = side or self.size
        size = image_size(data)
        box = random_resized_crop_box(*size, self.scale, self.ratio, rng)
        # The fast IDCT and chroma upsampling cost a little accuracy that random augmentation drowns out.
        flip = self.hflip and rng.random() < 0.5
        pixels = decode_region(data, size, box, side, side, fast=not self.full_decode, flip=flip,
                               scaled=not self.full_decode)
        if self.jitter > 0:
            pixels = color_jitter(pixels, self.jitter, rng)
        return pixels


class EvalPreset:
    """Resize the short side to size / crop_ratio, then take the centre size x size crop, in one resample."""

    def __init__(self, size: int = 224, crop_ratio: float = 0.875, full_decode: bool = False):
        self.size, self.crop_ratio, self.full_decode = size, crop_ratio, full_decode

    def centre_box(self, width: int, height: int) -> Box:
        side = min(width, height) * self.crop_ratio  # the crop's side in full-size pixels
        x0, y0 = (width - side) / 2, (height - side) / 2
        return x0, y0, x0 + side, y0 + side

    def __call__(self, data: bytes, rng=None, side: int = 0) -> np.ndarray:
        """`rng` and `side` are the training preset's arguments, unused: evaluation is the same every epoch."""
        size = image_size(data)
        return decode_region(data, size, self.centre_box(*size), self.size, self.size, scaled=not self.full_decode)

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The same for an image already decoded to an HxWx3 uint8 array (an upload the server checked)."""
        height, width = pixels.shape[:2]
        return resize_region(pixels, self.centre_box(width, height), self.size, self.size)


@functools.cache
def torchvision_functional():
    """torchvision.transforms.functional, or None where torchvision is missing or does not import (its
    compiled operators must match the installed torch)."""
    try:
        import torchvision.transforms.functional as tf  # optional: only the reference pipeline uses it
    except Exception:  # ImportError, or RuntimeError from a torchvision built for another torch
        return None
    return tf


def _open_rgb(data: bytes) -> Image.Image:
    """torchvision's ImageFolder loader: the whole image, converted to RGB."""
    with open_untrusted(data, DATA_FORMATS) as img:
        return img.convert("RGB")


class ReferenceTrainPreset(TrainPreset):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image, as its reference training
    scripts apply them (crop, then bilinear resize, antialiased by PIL). The crop box and the flip come
    from the same draws as the fast preset's. Colour jitter, when on, is the fast preset's."""

    def __call__(self, data: bytes, rng, side: int = 0) -> np.ndarray:
        side = side or self.size
        img = _open_rgb(data)
        x0, y0, x1, y1 = random_resized_crop_box(*img.size, self.scale, self.ratio, rng)
        flip = self.hflip and rng.random() < 0.5
        tf = torchvision_functional()
        if tf is not None:
            img = tf.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [side, side], tf.InterpolationMode.BILINEAR,
                                  antialias=True)
            img = tf.hflip(img) if flip else img
        else:  # what those calls do to a PIL image
            img = img.crop((x0, y0, x1, y1)).resize((side, side), Image.Resampling.BILINEAR)
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img
        pixels = np.array(img)
        return color_jitter(pixels, self.jitter, rng) if self.jitter > 0 else pixels


class ReferenceEvalPreset(EvalPreset):
    """torchvision's Resize(size / crop_ratio) of the short side, then CenterCrop(size): two resamples'
    worth of rounding where the fast preset does one."""

    def __call__(self, data: bytes, rng=None, epoch: int = 0) -> np.ndarray:
        img = _open_rgb(data)
        resize = round(self.size / self.crop_ratio)
        tf = torchvision_functional()
        if tf is not None:
            img = tf.resize(img, resize, tf.InterpolationMode.BILINEAR, antialias=True)
            return np.array(tf.center_crop(img, [self.size, self.size]))
        width, height = img.size
        if width <= height:  # torchvision's rounding of the long side
            new_size = (resize, int(resize * height / width))
        else:
            new_size = (int(resize * width / height), resize)
        img = img.resize(new_size, Image.Resampling.BILINEAR)
        left, top = int(round((new_size[0] - self.size) / 2.0)), int(round((new_size[1] - self.size) / 2.0))
        return np.array(img.crop((left, top, left + self.size, top + self.size)))


def make_train_preset(pipeline: str, size: int, scale, ratio, hflip: bool = True, jitter: float = 0.0) -> TrainPreset:
    if pipeline == "reference":
        return ReferenceTrainPreset(size, scale, ratio, hflip, jitter)
    return TrainPreset(size, scale, ratio, hflip, jitter, full_decode=pipeline == "full-decode")


def make_eval_preset(pipeline: str, size: int, crop_ratio: float) -> EvalPreset:
    if pipeline == "reference":
        return ReferenceEvalPreset(size, crop_ratio)
    return EvalPreset(size, crop_ratio, full_decode=pipeline == "full-decode")


def pipeline_description(pipeline: str) -> str:
    """What a pipeline name means on this machine (the reference one depends on torchvision importing)."""
    if pipeline == "reference":
        return "reference (torchvision transforms)" if torchvision_functional() else "reference (PIL, torchvision's steps)"
    return pipeline
