"""`prepare SOURCE --out URL --pack`: the prepared folder is written in a local work folder, exactly as a local
prepare writes it (resumable, all or nothing), and goes up to the URL as it is written.

- A background thread uploads each packed shard once it is complete (its `.sizes.npz` exists); packing never
  waits for it. A shard already at the URL (a rerun) is not uploaded again when it has the right size and the
  SHA-256 it went up with (as the URL's last prepared.json, or else this work folder's record of its uploads,
  RECORD, says) is the local shard's: a shard packed again, since a photo of it changed, goes up again even at
  the same size. Where neither knows (a folder prepared by an earlier version), the size decides.
- At the end: the shards still missing, the rest of `packed/`, the index files and problems.tsv, and the
  manifest (prepared.json) LAST. An existing manifest at the URL is removed before anything is uploaded, so a
  prepared folder at the URL is complete exactly when its manifest is there.
- Every upload is checked (storage/verified.py): its size, and for everything but the shards a SHA-256 of the
  bytes read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

from ..errors import UserError
from ..storage import urls
from ..storage.atomic import write_atomic
from ..storage.verified import put_verified, sha256_of
from .prepared import MANIFEST, STAGING, UNPACKED
from .shards import recorded_sha256, shard_path

CACHE = Path.home() / ".cache" / "imagenet-resnet" / "prepare"
RECORD = ".uploaded-shards.json"  # in the work folder, never uploaded: packed/NAME -> the SHA-256 it went up with


def default_work_dir(url: str) -> Path:
    """Where `prepare --out URL` packs when no --work-dir is given: one folder per URL, so a rerun resumes."""
    return CACHE / hashlib.sha256(urls.check_url(url).encode()).hexdigest()[:16]


class Uploader:
    """Uploads a prepared folder being written in `work` to `url`: shards while packing, the rest at finish()."""

    POLL = 0.5  # seconds between looks for newly completed shards

    def __init__(self, url: str, work: Path):
        self.url, self.work = urls.check_url(url), Path(work)
        self.fs, self.root = urls.filesystem(self.url)
        self.remote: dict[str, int] = {}  # name under the URL -> size, as listed at the start
        self.sent: dict[str, str] = {}  # shard name under the URL -> the SHA-256 it was uploaded with
        self.uploaded: list[str] = []
        self.skipped: list[str] = []
        self.watching: Path | None = None  # the packed folder being written
        self.error: str | None = None
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prepare-upload", daemon=True)

    def __enter__(self) -> Uploader:
        self.remote = self._listing()
        self.sent = self._read_record()
        if MANIFEST in self.remote:  # from here on, the folder at the URL is incomplete until the new manifest
            self.sent.update(self._guard(self._remote_digests))
            self._guard(lambda: self.fs.rm_file(self._key(MANIFEST)))
            del self.remote[MANIFEST]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, packed_dir: Path) -> None:
        """Upload the shards completed in `packed_dir` (DATA/packed, or its staging copy) as they appear."""
        self.watching = Path(packed_dir)

    def finish(self) -> None:
        """After the local prepare is complete: everything not yet uploaded, the manifest last."""
        self.__exit__()
        self.watching, self.error = self.work / "packed", None
        self._upload_shards()
        if self.error:
            raise UserError(f"--out {self.url}: upload failed ({self.error}); the local folder {self.work} is "
                            "complete: run the same prepare again to finish the upload")
        # Not the decompressed source (ImageNet-V2's tar, about 1.2 GB): the copy at the URL is read packed.
        files = sorted(p for p in self.work.rglob("*") if p.is_file() and STAGING not in p.parts
                       and p.relative_to(self.work).parts[0] != UNPACKED and p.name != RECORD)
        for path in (p for p in files if p.suffix != ".bin" and p.name != MANIFEST):
            self._guard(lambda: self._put(path, path.relative_to(self.work).as_posix(), checksum=True))
        self._guard(lambda: self._put(self.work / MANIFEST, MANIFEST, checksum=True))
        shards = sum(1 for name in self.uploaded if name.endswith(".bin"))
        print(f"upload: {shards} shards uploaded, {len(self.skipped)} already at {self.url}; "
              f"{len(self.uploaded) - shards} other files, {MANIFEST} last", file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL):
            self._upload_shards(self._stop)

    def _upload_shards(self, stop: threading.Event | None = None) -> None:
        if self.watching is None:
            return
        for marker in sorted(self.watching.glob("*.sizes.npz")):
            shard = marker.with_name(marker.name[: -len(".sizes.npz")] + ".bin")
            name = f"packed/{shard.name}"
            if stop is not None and stop.is_set():
                return
            if name in self._done:
                continue
            sha256 = recorded_sha256(marker)
            if self.remote.get(name) == shard.stat().st_size and self.sent.get(name) in (None, sha256):
                self.skipped.append(name)
                self._done.add(name)
                continue
            try:
                self._put(shard, name, checksum=False)
                self._done.add(name)
                if sha256 is not None:
                    self.sent[name] = sha256
                    write_atomic(json.dumps(self.sent, indent=1).encode(), self.work / RECORD)
            except Exception as e:  # noqa: BLE001 - kept for the message; finish() tries again and reports
                self.error = urls.redact(f"{name}: {type(e).__name__}: {e}")

    def _put(self, path: Path, name: str, checksum: bool) -> None:
        """Upload `path` as `name` under the URL and check it there: its size, and with `checksum` its SHA-256."""
        with open(path, "rb") as f:
            sha256, size = sha256_of(f) if checksum else (None, os.fstat(f.fileno()).st_size)
            f.seek(0)
            put_verified(self.fs, f, self._key(name), size, sha256)
        self.uploaded.append(name)

    def _guard(self, action):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - any store error becomes one line, without credentials
            raise UserError(urls.redact(f"--out {self.url}: upload failed ({type(e).__name__}: {e}); the local "
                                           f"folder {self.work} is complete: run the same prepare again to finish "
                                           "the upload")) from None

    def _read_record(self) -> dict[str, str]:
        try:
            record = json.loads((self.work / RECORD).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _remote_digests(self) -> dict[str, str]:
        """Shard name -> SHA-256, as the manifest at the URL records them (none from an earlier version's)."""
        try:
            splits = json.loads(self.fs.cat_file(self._key(MANIFEST)))["packed"]["splits"]
            return {shard_path(Path("packed"), split, k, ".bin").as_posix(): digest
                    for split, info in splits.items() for k, digest in enumerate(info.get("sha256") or [])}
        except (ValueError, KeyError, TypeError, AttributeError):  # not ours, or not packed: nothing known
            return {}

    def _key(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _listing(self) -> dict[str, int]:
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix):]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(prefix)}


def next_step(url: str, work: Path) -> str:
    """How to use the uploaded folder: here the work folder; elsewhere the URL, which train fetches once into a
    local cache (data/cache.py)."""
    return (f"{url} is complete ({MANIFEST} is there). Train here with --data {work} (the same prepared folder); "
            f"on another machine: imagenet-resnet train --data {url} [--data-cache DIR] (fetched once into "
            "~/.cache/imagenet-resnet/data/ by default, or DIR, and reused by later runs)")
