"""What the image fuzzing shares between tests/test_image_formats.py (a short run) and benchmarks/fuzz_images.py
(a long one):

- `ghostscript_stand_in(folder)`: a `gs` first on PATH that only records that it ran;
- `image_bytes()`: a Hypothesis strategy of random bytes and of small real images (every format an upload may
  be, and an EPS) with bytes changed, cut or inserted;
- `open_every_way(data)`: the bytes read as each path reads them (an upload; training and evaluation through
  the loader's dataset; prepare's check and packing), each outcome checked against that path's contract.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import time
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image

from imagenet_resnet.data.loader import ImageDataset
from imagenet_resnet.data.prepare import EXCLUDED, PackSettings, encode_for_pack, inspect
from imagenet_resnet.data.presets import make_eval_preset, make_train_preset
from imagenet_resnet.serving.images import ImageRejected, safe_open_image

# Five lines of PostScript: Pillow's EPS plugin opens it, and rasterises it by running Ghostscript.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n")
# The same behind the binary header of DOS EPS files (magic, PostScript offset and length, no WMF or TIFF preview).
DOS_EPS = struct.pack("<4sIIIIIIH", b"\xc5\xd0\xd3\xc6", 30, len(EPS), 0, 0, 0, 0, 0xFFFF) + EPS
TIME_LIMIT_S = 5.0  # per path and image; these images decode in milliseconds, a stall takes far longer
PACK_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what prepare's packing lists


@contextlib.contextmanager
def ghostscript_stand_in(folder: Path):
    """A `gs` first on PATH that appends its arguments to the file yielded (absent while it never ran) and
    exits 0. Pillow remembers whether it found Ghostscript: forgotten meanwhile, so that it looks on this PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    calls = folder / "gs-calls"
    script = folder / "gs"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 0\n')
    script.chmod(0o755)
    saved_path, saved_binary = os.environ["PATH"], EpsImagePlugin.gs_binary
    os.environ["PATH"], EpsImagePlugin.gs_binary = f"{folder}{os.pathsep}{saved_path}", None
    try:
        yield calls
    finally:
        os.environ["PATH"], EpsImagePlugin.gs_binary = saved_path, saved_binary


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def seed_images() -> dict[str, bytes]:
    """Small real images in every format an upload may be, odd modes among them, and EPS files."""
    y, x = np.mgrid[0:24, 0:32]
    rgb = Image.fromarray(np.stack([x * 8, y * 10, (x + y) * 4], -1).astype(np.uint8))
    return {
        "jpeg": _encoded(rgb, "JPEG", quality=90), "progressive.jpeg": _encoded(rgb, "JPEG", progressive=True),
        "cmyk.jpeg": _encoded(rgb.convert("CMYK"), "JPEG"), "png": _encoded(rgb, "PNG"),
        "palette.png": _encoded(rgb.convert("P"), "PNG"), "alpha.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "gif": _encoded(rgb, "GIF"), "bmp": _encoded(rgb, "BMP"), "tiff": _encoded(rgb, "TIFF", compression="tiff_lzw"),
        "webp": _encoded(rgb, "WEBP"), "eps": EPS, "dos.eps": DOS_EPS,
    }


SEEDS = seed_images()


@st.composite
def mutated_image(draw) -> bytes:
    """A starting image with a few bytes changed, deleted or inserted, or cut short. The places come from a
    Random that Hypothesis seeds: its own integers favour small values, which would only ever hit the header."""
    data = bytearray(draw(st.sampled_from(sorted(SEEDS.values()))))
    rng = draw(st.randoms(use_true_random=False))
    for _ in range(rng.randint(1, 4)):
        at, change = rng.randrange(len(data) + 1), rng.random()
        if change < 0.6:
            data[at : at + 1] = bytes([rng.randrange(256)])
        elif change < 0.75:
            del data[at : at + rng.randint(1, 64)]
        elif change < 0.9:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[at:]
    return bytes(data)


def image_bytes():
    return st.one_of(st.binary(max_size=2048), mutated_image())


class _OneImage:
    """An index of one image held in memory, as the loader's dataset reads an index."""

    labels = np.zeros(1, np.int32)

    def __init__(self, data: bytes):
        self.data = data

    def __len__(self) -> int:
        return 1

    def read(self, i: int) -> bytes:
        return self.data

    def describe(self, i: int) -> str:
        return "fuzzed.JPEG"


def _upload(data: bytes) -> bool:
    """An upload (predict, serve, the Space): 8-bit RGB pixels, or ImageRejected."""
    try:
        pixels = safe_open_image(data)
    except ImageRejected:
        return False
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
    return True


def _loaded(preset):
    """Training or evaluation: the dataset gives pixels, or None and a reason naming the file; never raises."""
    def read(data: bytes) -> bool:
        pixels, _, reason = ImageDataset(_OneImage(data), preset)[(0, 0, 0)]
        assert (pixels is None) == (reason is not None) and (reason is None or reason.startswith("fuzzed.JPEG: "))
        return pixels is not None
    return read


def _prepared(data: bytes) -> bool:
    """Prepare: its check gives a kind (the excluded ones are listed as problems), never raises; an image it
    keeps is packed as a JPEG or fails with an error that packing lists."""
    kind, _, _, _ = inspect(data, "fuzzed.JPEG")
    if kind in EXCLUDED:
        return False
    try:
        packed = encode_for_pack(data, kind, PackSettings(short_side=16))
    except PACK_ERRORS:
        return False
    assert packed[:2] == b"\xff\xd8"
    return True


PATHS = {
    "upload": _upload,
    "train": _loaded(make_train_preset("fast", 32, (0.08, 1.0), (3 / 4, 4 / 3))),
    "eval full-decode": _loaded(make_eval_preset("full-decode", 32, 0.875)),
    "eval reference": _loaded(make_eval_preset("reference", 32, 0.875)),
    "prepare": _prepared,
}


def open_every_way(data: bytes) -> dict[str, tuple[bool, float]]:
    """Path name -> (accepted, seconds) for these bytes; AssertionError where a path broke its contract or took
    longer than TIME_LIMIT_S. Any other exception escaping a path is a failure too."""
    outcomes = {}
    for name, read in PATHS.items():
        started = time.perf_counter()
        accepted = read(data)
        seconds = time.perf_counter() - started
        assert seconds < TIME_LIMIT_S, f"{name}: {seconds:.1f} s on {len(data)} bytes"
        outcomes[name] = accepted, seconds
    return outcomes
