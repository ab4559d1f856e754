"""The one way this package opens an image file it did not write itself (training data, an upload): Pillow tries
only the formats that path reads, never every plugin it has, and the pixel count is bounded from the header,
before anything is decoded (a decompression bomb: a small file claiming billions of pixels).

Why a list: Pillow's EPS plugin rasterises with Ghostscript, an interpreter run on the file's PostScript whose
-dSAFER sandbox has been escaped (CVE-2023-36664, CVE-2024-29510), and dozens of other plugins are decoders of
formats nobody here needs. A file of any other format is refused with one line, as is a file over its path's
pixel bound; one that starts as an accepted format does but cannot be read (a JPEG cut inside its header) is
said to be damaged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

MAX_PIXELS = 40_000_000  # an upload: a 40-megapixel RGB image is 120 MB decoded, a phone photo is 12 to 50
# Training data keeps PIL's own bomb limit (179 megapixels), as before this module: a dataset's panoramas and scans
# are the user's photos, and each loader worker decodes one image at a time.
DATA_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


class ImageRejected(UserError):
    """An image that is not read; the message says why and what to do, `status` is the HTTP code an upload
    gets for it."""

    def __init__(self, message: str, status: int = 415):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Formats:
    """The Pillow formats one path reads (JPEG includes MPO, a phone's JPEG with a second picture), and what
    a file of any other format is told; and the most pixels it decodes."""

    names: tuple[str, ...]
    refusal: str
    max_pixels: int


# What the serve page promises: predict, serve, the Space and the export checks read uploads with this list.
UPLOAD_FORMATS = Formats(("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"),
                         "not a readable image: use a JPEG, PNG, WebP, GIF, BMP or TIFF file", MAX_PIXELS)
# Prepare, training and evaluation: ImageNet is JPEG (with a few PNG and CMYK files named .JPEG); a class-folder
# tree may hold any of folder.IMAGE_EXTENSIONS, which name these formats.
DATA_FORMATS = Formats(("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM", "GIF"),
                       "not an image file (no image format recognised): training reads JPEG, PNG, BMP, WebP, TIFF, "
                       "PPM and GIF files; convert it to JPEG or remove it", DATA_MAX_PIXELS)


def check_pixels(width: int, height: int, formats: Formats) -> None:
    """Refuse an image of more pixels than `formats` reads, from its header's size."""
    if width * height > formats.max_pixels:
        raise ImageRejected(f"the image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels), "
                            f"over the {formats.max_pixels // 10**6} megapixel limit: use a smaller image", 413)


def _signature_of(data: bytes, formats: Formats) -> str | None:
    """The one of `formats` whose signature `data` starts with (PIL's own check of each format's first bytes).
    BMP's and PPM's are two letters ("BM", "P6") that a text file may start with: not taken for a signature."""
    Image.init()  # every plugin's signature check registered (none of them opens anything)
    for name in (n for n in formats.names if n not in ("BMP", "PPM")):
        accepts = Image.OPEN.get(name, (None, None))[1]
        if accepts is not None and accepts(data[:16]) is True:
            return name
    return None


def _damaged(data: bytes, formats: Formats, detail: str) -> ImageRejected:
    """A file PIL could not read: damaged (422) when it starts as one of `formats` does (a JPEG cut inside its
    header), else a format not read here (415)."""
    name = _signature_of(data, formats)
    if name is None:
        return ImageRejected(formats.refusal + detail)
    return ImageRejected(f"a {name} file, truncated or damaged before its pixels begin{detail}: use an intact copy "
                         "of the file", 422)


def open_untrusted(data: bytes, formats: Formats) -> Image.Image:
    """The image's header (nothing decoded yet), or ImageRejected when it is none of `formats`, is damaged or
    holds more than it reads."""
    try:
        image = Image.open(io.BytesIO(data), formats=formats.names)
    except UnidentifiedImageError:
        raise _damaged(data, formats, "") from None
    except Image.DecompressionBombError:  # PIL's own limit, far above ours, checked as it reads the header
        raise ImageRejected(f"the image claims more pixels than is safe to decode (a decompression bomb?): use "
                            f"an image of at most {formats.max_pixels // 10**6} megapixels", 413) from None
    except Exception as e:  # a header of an accepted format, damaged: PIL's plugins raise many kinds of error
        raise _damaged(data, formats, f" ({type(e).__name__}: {e})") from None
    try:
        check_pixels(*image.size, formats)
    except ImageRejected:
        image.close()
        raise
    return image
