"""The index of one split: where each image's bytes live, its label, and the class list, in numpy arrays.

Three kinds of storage:
- files:   one file per image, `root/names[i]` (a class-folder tree, Kaggle, Tiny-ImageNet);
- ranges:  byte ranges inside large files, `files[file_ids[i]]` at `offsets[i]`, `sizes[i]` bytes long
           (the official ILSVRC2012 tars read in place, and our packed shards);
- parquet: row `offsets[i]` of parquet file `files[file_ids[i]]` (Hugging Face shards; read in order to
           pack them, since a parquet row cannot be read on its own cheaply).
`root` is a URL (s3://...) for a source that `prepare` reads from object storage: ranges and parquet only,
read to be packed (`read_many` fetches nearby byte ranges together).

Everything per image is a numpy array, never a list of Python objects: data-loader workers fork with the
index, and numpy arrays are shared copy-on-write without reference counts touching every page. An index
is saved as one uncompressed .npz; loading 1.28M entries takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError, printable
from ..storage import urls
from ..storage.atomic import atomic_file

# Far above any photo (a 40-megapixel image, the most any reader here decodes, is 120 MB even uncompressed): a
# larger file is no image to train on, and reading it whole would only exhaust memory.
MAX_IMAGE_BYTES = 256 << 20


def name_array(names: list[str]) -> np.ndarray:
    """Image names as an index stores them: each the bytes of its file name (UTF-8, and on Linux any other bytes
    too, as os.fsencode gives them back), so that every name a folder or an archive holds can be indexed."""
    return np.array([os.fsencode(name) for name in names], dtype=np.bytes_)


def read_regular_file(path: str) -> bytes:
    """The bytes of the regular file at `path` (through any links), of at most MAX_IMAGE_BYTES; an OSError for
    anything else. A tree of images is the work of whoever made it: a link in it to /dev/zero or a FIFO would
    otherwise hang the read or fill the memory. O_NONBLOCK: opening a FIFO does not wait for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file (a device, FIFO or socket)")
        # Sized by fstat (a read of MAX_IMAGE_BYTES would allocate that much each time); one that holds more than
        # fstat says (growing, or in /proc, where sizes read 0) is read on, never past the limit.
        data = f.read(info.st_size + 1)
        if len(data) > info.st_size:
            data += f.read(MAX_IMAGE_BYTES + 1 - len(data))
        if len(data) > MAX_IMAGE_BYTES:
            raise _too_large(max(info.st_size, len(data)))
        return data


def _too_large(size: int) -> OSError:
    return OSError(f"{size:,} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB limit for one image")


def _printable(name: bytes) -> str:
    """A name for a message or problems.tsv: control characters (a newline, a tab, a terminal's escape) shown
    escaped, never acted on; bytes that are not UTF-8 shown as \\x.. escapes."""
    return printable(name.decode("utf-8", "backslashreplace"))


_IN_CONTAINER = re.compile(r" \((?:byte|row) \d+: (.*)\)$")  # ImageIndex.describe's "(byte 512: NAME)"


def short_name(where: str) -> str:
    """The image's own file name in an ImageIndex.describe() text: a file's name, or the name of an entry in a
    container (a tar's member, a parquet row) without the container and the parentheses around it."""
    entry = _IN_CONTAINER.search(where)
    return (entry[1] if entry else where).rsplit("/", 1)[-1]


@dataclass
class ImageIndex:
    storage: str
    root: Path | str  # files: the folder names are relative to; ranges/parquet: the folder (or URL) of `files`
    names: np.ndarray  # bytes: relative path (files) or a name for messages (ranges, parquet)
    labels: np.ndarray  # int32 label per image
    classes: list[str]  # class ids (WordNet IDs or folder names), in label order
    files: list[str] = field(default_factory=list)  # ranges/parquet: the container files
    file_ids: np.ndarray | None = None  # int32, into files
    offsets: np.ndarray | None = None  # int64 byte offset (ranges) or row number (parquet)
    sizes: np.ndarray | None = None  # int64 byte count (ranges)

    def __post_init__(self):
        self.root = self.root if urls.is_url(self.root) else Path(self.root)
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.names[i]))

    def describe(self, i: int) -> str:
        """Where image i is, for messages: a path, or a container file and position."""
        if self.storage == "files":
            return os.path.join(self.root, _printable(self.names[i]))
        where = f"byte {self.offsets[i]}" if self.storage == "ranges" else f"row {self.offsets[i]}"
        return f"{urls.join(self.root, self.files[self.file_ids[i]])} ({where}: {_printable(self.names[i])})"

    def read(self, i: int) -> bytes:
        if self.storage == "files":
            return read_regular_file(self.path(i))
        if self.storage == "ranges" and urls.is_url(self.root):
            found = self.read_many([i])[0]
            if isinstance(found, OSError):
                raise found
            return found
        if self.storage == "ranges":
            if self.sizes[i] > MAX_IMAGE_BYTES:
                raise _too_large(int(self.sizes[i]))
            return os.pread(self._handle(int(self.file_ids[i])), int(self.sizes[i]), int(self.offsets[i]))
        return self._parquet_row(int(self.file_ids[i]), int(self.offsets[i]))

    def read_many(self, positions) -> list[bytes | OSError]:
        """The bytes of several images, each an OSError where reading it failed; from a URL the byte ranges
        are fetched together, nearby ones in one request (so reading in storage order streams), and a failure
        to reach the store is an error of its own: nothing is judged unreadable for it."""
        positions = [int(i) for i in positions]
        if not (self.storage == "ranges" and urls.is_url(self.root)):
            return [self._read_or_error(i) for i in positions]
        found: list = [_too_large(int(self.sizes[i])) if self.sizes[i] > MAX_IMAGE_BYTES else None for i in positions]
        for file_id in sorted({int(self.file_ids[i]) for i in positions}):
            picks = [k for k, i in enumerate(positions) if self.file_ids[i] == file_id and found[k] is None]
            starts = [int(self.offsets[positions[k]]) for k in picks]
            ends = [start + int(self.sizes[positions[k]]) for start, k in zip(starts, picks)]
            url = urls.join(self.root, self.files[file_id])
            for k, data in zip(picks, urls.read_ranges(url, starts, ends)):
                if isinstance(data, Exception):
                    raise UserError(f"{url}: reading failed ({urls.redact(str(data))}); check the network and the "
                                    "credentials, then run the same command again") from data
                found[k] = data
        return found

    def _read_or_error(self, i: int) -> bytes | OSError:
        try:
            return self.read(i)
        except OSError as e:
            return e

    def _handle(self, file_id: int):
        # Opened lazily in each process: a forked worker opens its own descriptors (pread has no shared offset).
        key = (os.getpid(), file_id)
        if key not in self._handles:
            self._handles[key] = os.open(self.root / self.files[file_id], os.O_RDONLY)
        return self._handles[key]

    def _parquet_row(self, file_id: int, row: int) -> bytes:
        import pyarrow.parquet as pq

        # Per process: the open file with its row-group starts, and the last row group read (rows are read in order).
        key = ("parquet", os.getpid(), file_id)
        if key not in self._handles:
            where = urls.join(self.root, self.files[file_id])
            parquet = pq.ParquetFile(urls.open_read(where, 1 << 20) if urls.is_url(where) else where)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            self._handles[key] = (parquet, np.cumsum([0] + sizes))
        parquet, starts = self._handles[key]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        cached = self._handles.get(("parquet-group", os.getpid()))
        if cached is None or cached[:2] != (file_id, group):
            column = parquet.read_row_group(group, columns=["image"]).column("image").combine_chunks()
            cached = (file_id, group, column.field("bytes").to_pylist())
            self._handles[("parquet-group", os.getpid())] = cached
        return cached[2][row - int(starts[group])]

    def __getstate__(self):  # open descriptors stay in the process that opened them
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._handles = {}

    def empty_classes(self) -> list[str]:
        """The classes of which this index holds no image, in label order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return [self.classes[k] for k in np.flatnonzero(counts == 0)]

    def subset(self, keep: np.ndarray) -> ImageIndex:
        """The images at positions `keep` (a boolean mask or indices), classes unchanged."""
        pick = (lambda a: None if a is None else a[keep])
        return replace(self, names=self.names[keep], labels=self.labels[keep], file_ids=pick(self.file_ids),
                       offsets=pick(self.offsets), sizes=pick(self.sizes))

    def save(self, path: str | Path) -> None:
        """Write atomically; `root` is stored relative to the index's folder when it lies inside it."""
        path = Path(path)
        try:
            root = os.path.relpath(self.root.resolve(), path.parent.resolve())
            root = root if not root.startswith("..") else str(self.root.resolve())
        except ValueError:  # another drive (Windows)
            root = str(self.root.resolve())
        except AttributeError:  # a URL (a str), stored as it is
            root = self.root
        meta = {"storage": self.storage, "root": root, "classes": self.classes, "files": self.files}
        arrays = {"names": self.names, "labels": self.labels, "meta": np.array(json.dumps(meta))}
        for key in ("file_ids", "offsets", "sizes"):
            if getattr(self, key) is not None:
                arrays[key] = getattr(self, key)
        with atomic_file(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> ImageIndex:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: not a readable image index ({e}); run `imagenet-resnet prepare` again") from e
        root = meta["root"] if urls.is_url(meta["root"]) else Path(meta["root"])
        root = root if urls.is_url(root) or root.is_absolute() else path.parent / root
        return cls(meta["storage"], root, classes=meta["classes"], files=meta["files"], **arrays)
