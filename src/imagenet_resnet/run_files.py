"""The small files of a run, read from its run folder or from its mirror (`train --mirror URL`) alike, for
`report` and `status`: config.yaml, metrics.jsonl, steps.jsonl and train.log; never a checkpoint. And what
`train` checks of its --out before writing there.

Nothing here imports torch, so that `status` answers in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from .storage import urls
from .errors import UserError

CREDENTIALS_HINT = "check the URL, the network and the credentials (AWS_* variables, AWS_PROFILE, AWS_ENDPOINT_URL)"

CHECKPOINTS = ("last.pt", "previous.pt")  # what a resume continues from (best.pt is not: it may be epochs older)
# What a run writes before its first checkpoint: a run killed that early has nothing to lose by starting again.
BEFORE_FIRST_CHECKPOINT = {"train.log", "config.yaml", "steps.jsonl", "samples.jsonl", "tensorboard",
                           "tracking.json", "wandb", "budget.json"}
# And what its first epoch's end writes before last.pt: the record first, then best.pt (see trainer.train).
FIRST_EPOCH_END = {"metrics.jsonl", "metrics.csv", "best.pt"}
NEVER_A_RUNS = {"lost+found"}  # the root of a freshly made file system: --out /mnt/new-disk is fine
LOCK = ".lock"  # held by the trainer writing the folder (training/run_folder.py); a killed one may leave the file


def _entries(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                  if p.name not in NEVER_A_RUNS and p.name != LOCK)


def _named(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_new_run_folder(out_dir: Path) -> None:
    """`train` without --resume starts in an empty or new folder only: in a used one it would replace the
    earlier run's metrics and config, mix the two runs in train.log, or trip over files of another kind."""
    found = _entries(out_dir)
    if any(name in found for name in CHECKPOINTS):
        raise UserError(f"{out_dir} already holds a run; add --resume to continue it, or pick another --out")
    if found:
        raise UserError(f"--out {out_dir} already holds files ({_named(found)}); a new run starts in an empty or "
                        "new folder, so that nothing there is overwritten or mixed in: pick another --out, or "
                        "move those files aside (--resume continues a run from its last.pt)")


def check_nothing_to_lose(out_dir: Path) -> None:
    """`train --resume` where no checkpoint is: fine in an empty or new folder, or one a run left before its
    first checkpoint (killed in its first epoch, or at its end before last.pt was written: it starts again);
    refused where an earlier run's records or other files are (its checkpoints deleted, say): a new run there
    would replace and mix with them."""
    metrics = out_dir / "metrics.jsonl"
    records = parse_records(metrics.read_bytes()) if metrics.is_file() else []
    epochs = [r.get("epoch") if isinstance(r, dict) else None for r in records]
    left_by_a_kill = BEFORE_FIRST_CHECKPOINT | (FIRST_EPOCH_END if epochs in ([], [1]) else set())
    kept = [name for name in _entries(out_dir)
            if name.rstrip("/") not in left_by_a_kill and not (name.startswith(".") and name.endswith(".tmp"))]
    if kept:
        raise UserError(f"--resume: {out_dir} holds no {' or '.join(CHECKPOINTS)}, so there is nothing to resume "
                        f"from, but it holds other files ({_named(kept)}) that a new run would replace or mix "
                        "with: pick another --out, or move those files aside")


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
        self.remote = urls.is_url(run)
        self.root = urls.check_url(run) if self.remote else Path(run)
        if not self.remote and not self.root.is_dir():
            raise UserError(f"{run}: no such run folder; give the --out folder of a run, or the URL it is "
                            "mirrored to (--mirror)")

    def __str__(self) -> str:
        return str(self.root)

    @property
    def name(self) -> str:
        """The run's last path part: runs/r50 -> r50, s3://bucket/runs/r50 -> r50."""
        return urls.name(self.root) if self.remote else self.root.resolve().name

    def _reading(self, name: str, read):
        """`read()` of RUN/name; None where the file does not exist; any other failure is one line."""
        try:
            return read(urls.join(self.root, name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UserError:
            raise
        except Exception as e:  # the store unreachable, refusing, or a bucket we may not read
            first_line = (str(e) or type(e).__name__).strip().split("\n")[0]
            raise UserError(f"{self.root}: cannot read {name} ({urls.redact(first_line)}); {CREDENTIALS_HINT}"
                            if self.remote else f"{self.root / name}: cannot read it ({first_line})") from None

    def read(self, name: str) -> bytes | None:
        return self._reading(name, urls.read_bytes)

    def records(self, name: str) -> list[dict]:
        data = self.read(name)
        return parse_records(data) if data else []

    def slices(self, name: str, head: int, tail: int) -> tuple[bytes, bytes]:
        """The first `head` and the last `tail` bytes of RUN/name, the tail from its first whole line on; the
        whole file as the head when it is no longer than both. (b"", b"") where it does not exist. A log grows
        long over a run: only its ends are fetched."""

        def read_slices(path):
            total = urls.size(path)
            if total <= head + tail:
                return urls.read_bytes(path), b""
            first = urls.read_range(path, 0, head) if head else b""
            last = urls.read_range(path, total - tail, total)
            return first, last[last.find(b"\n") + 1:]  # the line the cut fell in is left out

        return self._reading(name, read_slices) or (b"", b"")

    def tail_records(self, name: str, size: int = 256 << 10) -> list[dict]:
        """The last records of a JSON-lines file, from its last `size` bytes."""
        whole, tail = self.slices(name, 0, size)
        return parse_records(whole or tail)
