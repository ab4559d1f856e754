"""The small files of a run, read from its run folder or from its mirror (`train --mirror URL`) alike, for
`report` and `status`: config.yaml, metrics.jsonl, steps.jsonl and train.log; never a checkpoint.

Nothing here imports torch, so that `status` answers in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import storage
from .errors import UserError

CREDENTIALS_HINT = "check the URL, the network and the credentials (AWS_* variables, AWS_PROFILE, AWS_ENDPOINT_URL)"


def parse_records(data: bytes) -> list[dict]:
    """The JSON lines of a metrics file; a line cut short (by a kill, or an upload of a file being written) is
    left out."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunFiles:
    """A run folder, or the URL a run is mirrored to (s3://bucket/prefix, any fsspec URL)."""

    def __init__(self, run: str | Path):
        self.remote = storage.is_url(run)
        self.root = storage.check_url(run) if self.remote else Path(run)
        if not self.remote and not self.root.is_dir():
            raise UserError(f"{run}: no such run folder; give the --out folder of a run, or the URL it is "
                            "mirrored to (--mirror)")

    def __str__(self) -> str:
        return str(self.root)

    @property
    def name(self) -> str:
        """The run's last path part: runs/r50 -> r50, s3://bucket/runs/r50 -> r50."""
        return storage.name(self.root) if self.remote else self.root.resolve().name

    def _reading(self, name: str, read):
        """`read()` of RUN/name; None where the file does not exist; any other failure is one line."""
        try:
            return read(storage.join(self.root, name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UserError:
            raise
        except Exception as e:  # the store unreachable, refusing, or a bucket we may not read
            first_line = (str(e) or type(e).__name__).strip().split("\n")[0]
            raise UserError(f"{self.root}: cannot read {name} ({storage.redact(first_line)}); {CREDENTIALS_HINT}"
                            if self.remote else f"{self.root / name}: cannot read it ({first_line})") from None

    def read(self, name: str) -> bytes | None:
        return self._reading(name, storage.read_bytes)

    def records(self, name: str) -> list[dict]:
        data = self.read(name)
        return parse_records(data) if data else []

    def slices(self, name: str, head: int, tail: int) -> tuple[bytes, bytes]:
        """The first `head` and the last `tail` bytes of RUN/name, the tail from its first whole line on; the
        whole file as the head when it is no longer than both. (b"", b"") where it does not exist. A log grows
        long over a run: only its ends are fetched."""

        def read_slices(path):
            total = storage.size(path)
            if total <= head + tail:
                return storage.read_bytes(path), b""
            first = storage.read_range(path, 0, head) if head else b""
            last = storage.read_range(path, total - tail, total)
            return first, last[last.find(b"\n") + 1:]  # the line the cut fell in is left out

        return self._reading(name, read_slices) or (b"", b"")

    def tail_records(self, name: str, size: int = 256 << 10) -> list[dict]:
        """The last records of a JSON-lines file, from its last `size` bytes."""
        whole, tail = self.slices(name, 0, size)
        return parse_records(whole or tail)
