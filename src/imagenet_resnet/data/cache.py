"""`train --data s3://bucket/prepared`: a prepared (packed) folder at a URL, fetched once into a local cache.

Training reads every image by a pread from local shards, so the folder `prepare --out URL --pack` uploaded is
brought down whole, once per machine, and reused by every later run:

    CACHE/<name>-<hash of the URL>/   the prepared folder, as `open_splits` opens it, and beside its files:
        .lock                          flock'ed while a process fetches: under torchrun one fetches, the rest wait
        .version.json                  the version the files here belong to (the SHA-256 of the remote
                                       prepared.json), written before the first of them
        .complete                      written last: the URL, the version, every file with its size
        NAME.part                      a file being fetched; the next fetch continues it from its size

CACHE is --data-cache, by default $XDG_CACHE_HOME/imagenet-resnet/data (~/.cache/imagenet-resnet/data).

What is checked:
- each shard's size against the packed index (the end of its last image), at the URL before fetching and
  here after, and its SHA-256 (computed as its bytes arrive) against the one prepare recorded in prepared.json
  while writing it: a shard damaged at the URL without a change of size is refused. A folder prepared by a
  version that recorded no digests is checked by size alone, and the fetch says so;
- each index (.npz) against the CRC-32s of its zip entries, and the packed ones against prepared.json
  (classes, images, bytes, shards);
- every other file's size against the store's listing;
- every name prepared.json and the packed indexes give (indexes, shards): written nowhere but the cache folder
  (storage/urls.local_path), and each packed index reads its images from the shards beside it;
- prepared.json is read once at the start and written here last; read again at the end, the copy is refused
  when it changed meanwhile (a new prepare --out began uploading), so that two versions are never mixed.
A complete copy is reused after a look at its files' sizes: reading it all back would cost a fetch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

from ..errors import UserError, disk_full_said
from ..storage import urls
from ..storage.atomic import commit_file, write_atomic
from .index import ImageIndex
from .prepared import FORMAT, MANIFEST

LOCK, VERSION, COMPLETE, PART = ".lock", ".version.json", ".complete", ".part"
CHUNK_BYTES = 16 << 20  # one ranged request; a fetch cut short loses at most this much per file
WORKERS = 8  # files fetched at once: one stream rarely fills the link to a store
OPTIONAL = ("problems.tsv", "packed/settings.json")  # fetched when there, for the record; training reads neither
AGAIN = "run the same command again: the fetch resumes where it stopped"
FULL_AGAIN = f"or give --data-cache DIR on a larger disk; {AGAIN}"  # after a full disk


def default_cache_root() -> Path:
    """Where fetched prepared folders go without --data-cache: $XDG_CACHE_HOME or ~/.cache, imagenet-resnet/data."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores a relative value
    return base / "imagenet-resnet" / "data"


def cache_folder(url: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder for `url`: a readable name (bucket and last folder) and a hash of the whole URL, so that
    two URLs never share a folder."""
    url = urls.check_url(url)
    parts = urlsplit(url)
    words = [parts.netloc, *parts.path.strip("/").split("/")[-1:]]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(w for w in words if w)).strip("-.")[:60]
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    return root / (f"{readable}-{digest}" if readable else digest)


def fetch_prepared(url: str, cache_dir: str | Path | None = None, log=print, *, workers: int = WORKERS,
                   chunk_bytes: int = CHUNK_BYTES) -> Path:
    """The local copy of the prepared folder at `url`, fetched unless a complete copy of the same version is
    already in the cache (see the module's docstring); a folder `open_splits` opens."""
    url = urls.check_url(url)
    folder = cache_folder(url, cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the cache folder ({e.strerror}); give --data-cache DIR on a disk "
                        "you can write to") from e
    with _locked(folder / LOCK, log):
        return _fetch_locked(_Remote(url), folder, log, workers, chunk_bytes)


@contextmanager
def _locked(path: Path, log):
    """One fetching process per cache folder at a time. flock is released when the file closes, and by the
    kernel when its holder is killed: a fetch killed midway never blocks the next one."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{path.parent}: another process is fetching into it; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


class _Remote:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = urls.filesystem(url)

    def key(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def manifest(self) -> bytes:
        return self.fs.cat_file(self.key(MANIFEST))

    def listing(self) -> dict[str, int]:
        """Every file under the URL (relative name -> size)."""
        self.fs.invalidate_cache(self.root)
        found = self.fs.find(self.root, detail=True)
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix):]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(prefix)}


def _remote_manifest(remote: _Remote, folder: Path, complete: dict | None, log) -> bytes | None:
    """The URL's manifest; None when the store is out of reach but a complete copy here still serves."""
    url = remote.url
    try:
        return remote.manifest()
    except FileNotFoundError:
        raise UserError(f"{url}: no {MANIFEST} there: not a prepared folder, or its upload has not finished (the "
                        f"manifest goes up last); run `imagenet-resnet prepare SOURCE --out {url} --pack` to "
                        "complete it") from None
    except Exception as e:  # noqa: BLE001
        if complete and complete.get("url") == url and not _damage(folder, complete):
            log(f"warning: cannot reach {url} ({_one_line(e)}); using the copy fetched into {folder} on "
                f"{complete['fetched']}, without knowing whether the URL changed since")
            return None
        raise UserError(f"{url}/{MANIFEST}: cannot read it ({_one_line(e)}); check the network and the "
                        "credentials, then run the same command again") from None


def _fetch_locked(remote: _Remote, folder: Path, log, workers: int, chunk_bytes: int) -> Path:
    url, complete = remote.url, _read_json(folder / COMPLETE)
    manifest_bytes = _remote_manifest(remote, folder, complete, log)
    if manifest_bytes is None:
        return folder
    version = hashlib.sha256(manifest_bytes).hexdigest()
    if _copy_is_current(folder, url, version, complete, log):
        return folder

    manifest = _parse_manifest(url, manifest_bytes)
    try:
        listing = remote.listing()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{url}: cannot list it ({_one_line(e)}); check the network and the credentials, then run "
                        "the same command again") from None
    indexes = [f"packed/{split}.index.npz" for split in manifest["packed"]["splits"]]
    for name in indexes:
        if name not in listing:
            raise _damaged_at_url(url, name, "missing")
    others = [f"{split}.index.npz" for split in manifest["splits"]] + list(OPTIONAL)
    small = {name: listing[name] for name in indexes + [n for n in others if n in listing]}
    _check_room(folder, sum(small.values()) + sum(s["bytes"] for s in manifest["packed"]["splits"].values()))

    with _Fetcher(remote, folder, workers, chunk_bytes) as fetcher:
        fetcher.fetch(small, f"{url}/{MANIFEST}: the index")
        for name in small:
            if name.endswith(".npz"):
                _check_zip(url, folder, name)
        shards = {split: _shard_sizes(url, folder, split, manifest) for split in manifest["packed"]["splits"]}
        digests = _shard_digests(url, manifest, shards, log)
        for name, size in (item for found in shards.values() for item in found.items()):
            if name not in listing:
                raise _damaged_at_url(url, name, "missing (the packed index lists it)")
            if listing[name] != size:
                raise _damaged_at_url(url, name, f"{listing[name]} bytes, the index says {size}")
        for split, found in shards.items():
            fetcher.fetch(found, f"{url}/packed/{split}.index.npz: the shard", digests)

    files = {**small, **{name: size for found in shards.values() for name, size in found.items()}}
    _check_fetched(remote, folder, files, manifest_bytes)
    write_atomic(manifest_bytes, folder / MANIFEST, again=FULL_AGAIN)
    record = {"url": url, "version": version, "fetched": time.strftime("%Y-%m-%d %H:%M:%S"),
              "files": {**files, MANIFEST: len(manifest_bytes)},
              "checked": "shard sizes against the packed indexes" + (", their SHA-256s" if digests else "")
                         + " and index CRC-32s and counts against prepared.json, other sizes against the listing",
              "fetched_bytes": fetcher.fetched, "reused_bytes": fetcher.reused}
    _write_json(folder / COMPLETE, record)  # the marker, last: the copy is complete and checked
    total = sum(record["files"].values())
    resumed = f"; {_size(fetcher.reused)} were already here from a fetch cut short" if fetcher.reused else ""
    log(f"fetched {url} into {folder}: {len(record['files'])} files, {_size(total)}{resumed}")
    return folder


def _copy_is_current(folder: Path, url: str, version: str, complete: dict | None, log) -> bool:
    """Whether the complete copy in `folder` is of this version of the URL, whole; otherwise the folder is made
    ready for this version's files (kept when they are this version's, from a fetch cut short)."""
    if complete and complete.get("url") == url and complete.get("version") == version:
        damage = _damage(folder, complete)
        if not damage:
            log(f"{url}: unchanged since it was fetched into {folder} on {complete['fetched']}; using that copy")
            return True
        log(f"{folder}: {damage}; fetching what is missing")
        (folder / COMPLETE).unlink()
    elif complete or (_read_json(folder / VERSION) or {}).get("version") != version:
        if complete or _read_json(folder / VERSION):
            log(f"{url} changed since it was fetched into {folder}: fetching the new version in its place")
        _clear(folder)  # files of another version (or of none known) are never mixed with this one's
    _write_json(folder / VERSION, {"url": url, "version": version})
    return False


def _check_fetched(remote: "_Remote", folder: Path, files: dict[str, int], manifest_bytes: bytes) -> None:
    """Every file in place and whole, and the URL's manifest still the one fetched."""
    for name, size in files.items():
        if (folder / name).stat().st_size != size:
            raise UserError(f"{folder / name}: {(folder / name).stat().st_size} bytes after fetching, {size} "
                            f"expected; {AGAIN}")
    try:
        unchanged = remote.manifest() == manifest_bytes
    except Exception:  # noqa: BLE001 - gone (a new upload removed it first) or out of reach: not known to be this one
        unchanged = False
    if not unchanged:
        raise UserError(f"{remote.url} changed while it was being fetched into {folder} (a new prepare --out is "
                        "uploading there?); once its upload has finished, run the same command again to fetch the "
                        "new version")


def _parse_manifest(url: str, data: bytes) -> dict:
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise _damaged_at_url(url, MANIFEST, f"not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{url}/{MANIFEST}: format {found!r}, expected {FORMAT!r}; run `imagenet-resnet prepare "
                        f"SOURCE --out {url} --pack` again with this version")
    if not manifest.get("packed"):
        raise UserError(f"{url}: prepared without --pack; training fetches only a packed copy: run `imagenet-resnet "
                        f"prepare SOURCE --out {url} --pack`")
    return manifest


def _check_zip(url: str, folder: Path, name: str) -> None:
    """An .npz is a zip: every entry carries a CRC-32 of its bytes, checked here (np.load would raise
    BadZipFile, with a traceback, only on reading the entry)."""
    try:
        with zipfile.ZipFile(folder / name) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        raise _damaged_at_url(url, name, f"not a readable index ({e})") from None
    if bad is not None:
        raise _damaged_at_url(url, name, f"its entry {bad} fails its CRC-32 check")


def _shard_sizes(url: str, folder: Path, split: str, manifest: dict) -> dict[str, int]:
    """packed/NAME -> bytes, for the shards of one split: each shard holds its images back to back (an image
    that failed to pack takes no bytes), so its size is the end of its last image."""
    name = f"packed/{split}.index.npz"
    try:
        index = ImageIndex.load(folder / name)
    except UserError as e:
        raise _damaged_at_url(url, name, str(e).split(";")[0].split(": ", 1)[-1]) from None
    if index.storage != "ranges" or index.sizes is None:
        raise _damaged_at_url(url, name, f"a {index.storage!r} index, not the packed copy's byte ranges")
    if index.root != folder / "packed":  # training would read there, not the shards fetched and checked here
        raise _damaged_at_url(url, name, f"its images are read from {index.root}, not from the shards beside it")
    expected = manifest["packed"]["splits"][split]
    found = {"images": len(index), "bytes": int(index.sizes.sum()), "shards": len(index.files)}
    if index.classes != manifest["classes"] or found != {k: expected.get(k) for k in found}:
        what = "its classes differ" if index.classes != manifest["classes"] else f"{found}, it says {expected}"
        raise _damaged_at_url(url, name, f"does not match {MANIFEST} ({what})")
    ends = np.zeros(len(index.files), np.int64)
    np.maximum.at(ends, index.file_ids, index.offsets + index.sizes)
    return {f"packed/{file}": int(end) for file, end in zip(index.files, ends)}


def _shard_digests(url: str, manifest: dict, shards: dict[str, dict[str, int]], log) -> dict[str, str]:
    """packed/NAME -> the SHA-256 prepare recorded for each shard (prepared.json lists them in shard order, as the
    packed index lists the files); none, said once, for a folder prepared before digests were recorded."""
    digests = {}
    for split, found in shards.items():
        recorded = manifest["packed"]["splits"][split].get("sha256")
        if recorded is None:
            log(f"{url}: prepared by a version that recorded no shard digests, so its shards are checked by size "
                f"alone; to add them, run `imagenet-resnet prepare SOURCE --out {url} --pack` again")
            return {}
        if not isinstance(recorded, list) or len(recorded) != len(found):
            raise _damaged_at_url(url, MANIFEST, f"its {split} SHA-256s do not match the packed index's "
                                                 f"{len(found)} shards")
        digests.update(zip(found, recorded))
    return digests


class _Fetcher:
    """Fetches files into the cache folder, `workers` at a time, each in ranged chunks appended to NAME.part and
    renamed once whole; with one progress bar over the bytes to fetch."""

    def __init__(self, remote: _Remote, folder: Path, workers: int, chunk_bytes: int):
        self.remote, self.folder = remote, folder
        self.workers, self.chunk_bytes = max(1, workers), max(1, chunk_bytes)
        self.fetched = self.reused = 0  # bytes fetched by this call / found here already
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._bar = tqdm(total=0, desc=f"fetch {folder.name}", unit="B", unit_scale=True, unit_divisor=1024,
                         smoothing=0.1, mininterval=0.5 if sys.stderr.isatty() else 30, file=sys.stderr)

    def __enter__(self) -> _Fetcher:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def fetch(self, files: dict[str, int], source: str, digests: dict[str, str] | None = None) -> None:
        """`files` (name -> size), their names from `source` (what handed them out, for the message refusing one):
        every name is checked before any is fetched. `digests`: the SHA-256 a file must have (name -> hex)."""
        paths = {name: urls.local_path(self.folder, name, source) for name in files}
        todo = []
        for name, size in files.items():
            final, part = paths[name], paths[name].with_name(paths[name].name + PART)
            if final.exists():
                if final.stat().st_size == size:  # renamed into place only once whole and checked
                    self.reused += size
                    continue
                final.unlink()
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            self.reused += have
            todo.append((name, final, size, have, (digests or {}).get(name)))
        self._bar.total += sum(size - have for _, _, size, have, _ in todo)
        self._bar.refresh()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(self._fetch_one, *job) for job in todo]
            errors = []
            for future in futures:
                try:
                    future.result()
                except BaseException as e:  # noqa: BLE001 - the others stop at their next chunk; the first is raised
                    self._stop.set()
                    errors.append(e)
        if errors:
            raise errors[0]

    def _fetch_one(self, name: str, final: Path, size: int, have: int, sha256: str | None) -> None:
        part = final.with_name(final.name + PART)
        where, key = f"{self.remote.url}/{name}", self.remote.key(name)
        try:
            with disk_full_said(part, FULL_AGAIN):
                part.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                if have:  # the bytes a fetch cut short left: read once more, here
                    with open(part, "rb") as kept:
                        while block := kept.read(self.chunk_bytes):
                            digest.update(block)
                with open(part, "ab") as f:  # kept when cut short: the next fetch continues it
                    position = have
                    while position < size:
                        if self._stop.is_set():
                            return
                        end = min(position + self.chunk_bytes, size)
                        data = self._get(where, key, position, end)
                        if len(data) != end - position:
                            raise UserError(f"{where}: got {len(data)} bytes at byte {position}, expected "
                                            f"{end - position} (a new prepare --out is uploading there?); {AGAIN}")
                        f.write(data)
                        digest.update(data)
                        position = end
                        with self._lock:
                            self.fetched += len(data)
                            self._bar.update(len(data))
                    if sha256 is not None and digest.hexdigest() != sha256:
                        part.unlink()
                        raise UserError(f"{where}: its SHA-256 is not the one {MANIFEST} records for it (damaged at "
                                        "the URL without a change of size); delete it there and run `imagenet-resnet "
                                        f"prepare SOURCE --out {self.remote.url} --pack` again, which uploads it anew, "
                                        "then this command")
                    commit_file(f, part, final)
        except OSError as e:
            raise UserError(f"{part}: cannot write it ({e.strerror or e}); give --data-cache DIR on a disk you can "
                            "write to") from e

    def _get(self, where: str, key: str, start: int, end: int) -> bytes:
        try:
            return self.remote.fs.cat_file(key, start=start, end=end)
        except FileNotFoundError:
            raise UserError(f"{where}: gone from the URL while it was fetched (a new prepare --out is uploading "
                            "there?); once that has finished, run the same command again") from None
        except Exception as e:  # noqa: BLE001 - any store error: one line, without credentials
            raise UserError(f"{where}: download failed ({_one_line(e)}); check the network and the credentials, "
                            f"then {AGAIN}") from None


def _damaged_at_url(url: str, name: str, what: str) -> UserError:
    return UserError(f"{url}/{name}: {what}; the prepared folder at the URL is damaged or was not uploaded whole: "
                     f"run `imagenet-resnet prepare SOURCE --out {url} --pack` again, then this command")


def _damage(folder: Path, complete: dict) -> str | None:
    """What is missing or changed in a complete copy (only sizes: reading it all back would cost a fetch)."""
    for name, size in complete.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when fetched"
    return None


def _check_room(folder: Path, total: int) -> None:
    here = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    free = shutil.disk_usage(folder).free
    if total - here > free:
        raise UserError(f"{folder}: {_size(total - here)} to fetch but {_size(free)} free there; free space or give "
                        "--data-cache DIR on a larger disk")


def _clear(folder: Path) -> None:
    """Everything in the cache folder but the lock (held by this process); the marker first."""
    (folder / COMPLETE).unlink(missing_ok=True)
    for path in folder.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _write_json(path: Path, value: dict) -> None:
    write_atomic(json.dumps(value, indent=1).encode(), path, again=FULL_AGAIN)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return urls.redact(f"{type(error).__name__}: {text[0] if text else ''}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
