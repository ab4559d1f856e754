"""Copies between this machine and a store (an fsspec filesystem) that are proven, not assumed.

- put_verified: a local file streamed up (an unfinished multipart upload is aborted, not left behind), then read
  back: the object must have the file's size and, when a SHA-256 is given, its SHA-256. The run mirror puts its
  checkpoints this way and the shard upload (`prepare --out URL`) every file.
- get_verified: an object streamed down into a local file atomically (storage/atomic.py), checked against a
  SHA-256 when one is given before it replaces anything.
- compressed_records: whether a checkpoint file (torch.save's zip) holds a compressed record, a zip bomb torch.load
  would inflate: every reader of a checkpoint from elsewhere asks first.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

from .atomic import atomic_file

CHUNK = 8 << 20  # bytes per read and per request
PART = 5 << 20  # S3's smallest multipart part


def sha256_of(f, chunk: int = CHUNK) -> tuple[str, int]:
    """The SHA-256 (hex) and the size of what is left to read in the binary file `f`."""
    digest, size = hashlib.sha256(), 0
    while block := f.read(chunk):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


class DamagedCopy(OSError):
    """A copy whose size or SHA-256 is not the original's."""


def put_verified(fs, f, key: str, size: int, sha256: str | None = None) -> None:
    """Upload the binary file `f` (from where it stands) as `key`, then read it back: DamagedCopy unless it has
    `size` bytes and, with `sha256`, that SHA-256."""
    if "file" in fs.protocol:  # a local store: its folders are not made by a write
        fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
    out = fs.open(key, "wb", block_size=max(CHUNK, PART))
    try:
        shutil.copyfileobj(f, out, CHUNK)
    except BaseException:
        if hasattr(out, "discard"):
            out.discard()  # an unfinished multipart upload is aborted
        raise
    out.close()
    fs.invalidate_cache(key)
    found = int(fs.size(key))
    if found != size:
        raise DamagedCopy(f"{key}: the uploaded object has {found} bytes, not {size} as the local file")
    if sha256 is not None:
        with fs.open(key, "rb", block_size=CHUNK) as back:
            if sha256_of(back)[0] != sha256:
                raise DamagedCopy(f"{key}: the bytes read back differ from the local file (SHA-256)")


def get_verified(fs, key: str, path: str | Path, sha256: str | None = None) -> None:
    """The object `key` written as the local file `path`, whole or not at all; DamagedCopy (and `path` as it
    was) when its SHA-256 is not `sha256`."""
    digest = hashlib.sha256()
    with atomic_file(path) as out, fs.open(key, "rb", block_size=CHUNK) as f:
        while block := f.read(CHUNK):
            digest.update(block)
            out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DamagedCopy(f"{key}: the bytes read back differ from the SHA-256 expected")


def compressed_records(path: str | Path) -> bool:
    """Whether `path`, a zip file (torch.save's format), holds a compressed record. torch.save stores every record
    as it is, so that a file's size bounds what loading it takes; torch.load would inflate a compressed one into
    memory however large it declares itself (a zip bomb: a 1 MB file asking for 1 GB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return False  # not a zip (an older torch format, or no weights at all): torch.load says which
