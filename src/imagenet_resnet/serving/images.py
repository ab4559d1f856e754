"""Opening an image someone uploaded, safely: one of the formats the page promises (no other Pillow plugin
sees it), bounded in bytes, and in pixels before any decoding (decompression bombs), the first frame of an
animation, 16-bit depth scaled to 8, transparency composited onto white, EXIF rotation applied, any colour
mode turned into RGB; or a one-line message saying what is wrong. `serve`, `predict` and the export checks
all read images through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..data.untrusted_images import UPLOAD_FORMATS, ImageRejected, open_untrusted

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I": 16-bit PNG/TIFF in some Pillow versions
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def too_large(size: int) -> ImageRejected:
    return ImageRejected(f"the file is {size / 2**20:.1f} MiB, over the {MAX_UPLOAD_BYTES // 2**20} MiB limit: "
                         f"use a smaller image", 413)


def read_image_bytes(source: bytes | str | Path) -> bytes:
    """An image file's bytes, refused when empty or over MAX_UPLOAD_BYTES (before reading it all)."""
    if isinstance(source, (str, Path)):
        size = Path(source).stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise too_large(size)
        source = Path(source).read_bytes()
    if not source:
        raise ImageRejected("the file is empty (0 bytes): not an image", 400)
    if len(source) > MAX_UPLOAD_BYTES:
        raise too_large(len(source))
    return source


def open_image(data: bytes) -> Image.Image:
    """The image's header (nothing decoded yet), refused when it is not one of the formats the page promises
    or holds too many pixels."""
    image = open_untrusted(data, UPLOAD_FORMATS)
    if image.mode == "F":
        image.close()
        raise ImageRejected("32-bit floating-point images are not supported: save it as an 8-bit PNG or JPEG")
    return image


def decodes_as_stored(image: Image.Image) -> bool:
    """Whether the plain decode that training and `evaluate` use gives this image as a viewer shows it: 8-bit,
    no transparency, no EXIF rotation. Others (16-bit, alpha, a rotated phone photo) are converted first."""
    try:
        rotated = image.getexif().get(0x0112, 1) not in (0, 1)  # 0x0112: EXIF Orientation
    except Exception:  # a malformed EXIF block: the pixels are used as stored
        rotated = False
    return image.mode in ("RGB", "L", "CMYK", "YCbCr", "1", "P") and "transparency" not in image.info and not rotated


def safe_open_image(source: bytes | str | Path, min_side: int = 0) -> np.ndarray:
    """An image's pixels as an HxWx3 uint8 RGB array, or ImageRejected naming the problem. A JPEG is decoded
    at the smallest DCT scale that keeps its short side at least `min_side`: a phone photo then costs a
    fraction of the time and memory of a full decode."""
    with open_image(read_image_bytes(source)) as image:
        try:
            if min_side and image.format == "JPEG":
                image.draft(None, (min_side, min_side))
            image.load()  # an animated GIF, PNG or WebP: its first frame
            return _to_rgb(image)
        except ImageRejected:
            raise
        except Exception as e:  # truncated or damaged data; PIL's decoders raise many kinds of error
            raise ImageRejected(f"the image could not be decoded ({e}): the file may be truncated or damaged",
                                422) from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    try:
        image = ImageOps.exif_transpose(image)  # phone photos: upright, as the browser shows them
    except Exception:
        pass  # a malformed EXIF block: keep the pixels as stored
    if image.mode in SIXTEEN_BIT_MODES:  # PIL's convert("RGB") would clip 16-bit values at 255: all white
        gray = np.asarray(image).astype(np.int64).clip(0, 65535)
        return np.repeat(((gray + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return np.array(image.convert("RGB"))  # grayscale, palette, CMYK, YCbCr, 1-bit
    except ValueError:
        raise ImageRejected(f"the colour mode {image.mode} is not supported: save it as an RGB JPEG or PNG") from None
