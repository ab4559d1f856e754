"""A packed shard, DATA/packed/{split}-NNNNN.bin (JPEGs back to back), and its record, NNNNN.sizes.npz.

The record is written last: its presence marks the shard complete. It holds
- sizes: each image's bytes in the shard (0: it failed to pack, and the packed index leaves it out);
- failed: why each of those failed (JSON);
- sha256: the SHA-256 of the shard file, computed while it was written (the bytes pass through memory anyway).
  prepared.json lists them, and `prepare --verify` and the bucket cache (cache.py) compare them with the bytes
  they read: a shard damaged without a change of size is caught;
- sources: each image's source digest (source_digest), from the bytes it was packed from. Every prepare reads
  every source image to check it, and `--verify` reads them again: both compare these digests, so a photo
  replaced, renamed or relabelled since it was packed is seen (and a prepare re-packs its shard alone).
A record written before digests existed holds sizes and failed alone: "unrecorded".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..storage.atomic import atomic_file

AGAIN = "run the same prepare again: it resumes its packing"  # after a full disk
DIGEST_BYTES = 32  # a SHA-256
NO_DIGEST = bytes(DIGEST_BYTES)  # an image that could not be read
CURRENT, UNRECORDED, CHANGED, MISSING = "current", "unrecorded", "changed", "missing"  # shard_state's answers


def shard_path(out_dir: Path, split: str, shard: int, suffix: str) -> Path:
    return out_dir / f"{split}-{shard:05d}{suffix}"


def source_digest(name: bytes, label: int, data: bytes | OSError) -> bytes:
    """What one image is packed from: a SHA-256 of its name, label and bytes (NO_DIGEST when it was unreadable)."""
    if isinstance(data, OSError):
        return NO_DIGEST
    digest = hashlib.sha256(b"%s\0%d\0" % (name, label))
    digest.update(data)
    return digest.digest()


def write_record(out_dir: Path, split: str, shard: int, sizes: np.ndarray, failed: dict, sources: np.ndarray,
                 sha256: str) -> None:
    path = shard_path(out_dir, split, shard, ".sizes.npz")
    with atomic_file(path, temp=shard_path(out_dir, split, shard, ".sizes.npz.part"), again=AGAIN) as f:
        np.savez(f, sizes=sizes, failed=np.array(json.dumps({str(k): v for k, v in failed.items()})),
                 sources=sources, sha256=np.array(sha256))


def read_record(out_dir: Path, split: str, shard: int) -> dict | None:
    """The shard's record: sizes, failed ({position: why}), and sources and sha256 (None in an unrecorded one);
    None when the shard is not complete."""
    try:
        with np.load(shard_path(out_dir, split, shard, ".sizes.npz")) as z:
            return {"sizes": z["sizes"], "failed": {int(i): v for i, v in json.loads(str(z["failed"])).items()},
                    "sources": z["sources"] if "sources" in z.files else None,
                    "sha256": str(z["sha256"]) if "sha256" in z.files else None}
    except (OSError, ValueError, KeyError):
        return None


def recorded_sha256(marker: Path) -> str | None:
    """The SHA-256 the record `marker` (a .sizes.npz) holds of its shard; None for an unrecorded or unreadable one."""
    try:
        with np.load(marker) as z:
            return str(z["sha256"]) if "sha256" in z.files else None
    except (OSError, ValueError):
        return None


def shard_state(out_dir: Path, split: str, shard: int, sources: np.ndarray) -> tuple[str, dict | None]:
    """(state, record) of a shard: MISSING (not complete, or its file gone or of another size than its record
    says), CHANGED (packed from other images than those whose source digests are `sources`), UNRECORDED or
    CURRENT."""
    record = read_record(out_dir, split, shard)
    try:
        size = os.stat(shard_path(out_dir, split, shard, ".bin")).st_size
    except OSError:
        size = None
    if record is None or size != record["sizes"].sum():
        return MISSING, record
    if record["sources"] is None:
        return UNRECORDED, record
    return (CURRENT if np.array_equal(record["sources"], sources) else CHANGED), record


def link_shard(from_dir: Path, to_dir: Path, split: str, shard: int) -> None:
    """The complete shard in `from_dir` (file and record) also in `to_dir`, without copying its bytes where the
    file system allows hard links (a prepare's staging folder is inside DATA, on the same disk)."""
    for suffix in (".bin", ".sizes.npz"):
        source, target = shard_path(from_dir, split, shard, suffix), shard_path(to_dir, split, shard, suffix)
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links (FAT, some network shares): a copy
            shutil.copyfile(source, target)


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def add_digests(out_dir: Path, split: str, shards: list[int], sources: list[np.ndarray], workers: int) -> None:
    """Complete the records of unrecorded shards: the SHA-256 of each file as it is now, and `sources` (the
    current sources' digests) taken as what it was packed from. Threads: hashlib reads without the GIL."""
    def complete(k: int, shard_sources: np.ndarray) -> None:
        record = read_record(out_dir, split, k)
        sha256 = file_sha256(shard_path(out_dir, split, k, ".bin"))
        write_record(out_dir, split, k, record["sizes"], record["failed"], shard_sources, sha256)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(complete, shards, sources))
