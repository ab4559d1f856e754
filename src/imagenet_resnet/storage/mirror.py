"""A run folder mirrored to object storage as it is written (`train --mirror URL`), and restored from there
(`--resume --mirror URL` on a new machine), so that a reclaimed spot instance loses nothing but its disk.
The trainer opens it (open_mirror) and tells it of each file it wrote; uploads and downloads are checked
(storage/verified.py), and files come down atomically (storage/atomic.py).

Under URL (any fsspec URL: s3://bucket/prefix, gs://..., a local path):

    checkpoints.json       the pointer: the newest good checkpoint (last), the one before it (previous) and
                           best, each with its key, size, SHA-256, epoch and global step
    checkpoints/<hash>.pt  the checkpoints it names, each under its content hash
    lease.json             who writes here: owner, machine, process, generation and heartbeat
    config.yaml, metrics.jsonl, metrics.csv, steps.jsonl, train.log, tensorboard/, report/: as in RUN/

Rank 0 only. The trainer tells the mirror about each file once it is written (atomically), and a background
thread uploads it, so a training step never waits on the store:
- The queue holds one entry per file name and no data: a file written again while its upload waits goes up
  once, in its newest version (the newest checkpoint wins); the queue is as long as the run folder, at most.
  Files nobody announces (train.log, steps.jsonl, TensorBoard events) are swept up every SWEEP_SECONDS and
  with each checkpoint.
- A checkpoint goes up under a key no pointer names yet (its content hash), is read back and checked (size
  and SHA-256), and only then named in checkpoints.json: an upload cut short never replaces a good one.
- While the store cannot be reached: one warning, retries with backoff, and a line when it has caught up.
- At the end of the run, a stop signal included, it waits for the queue to empty (at most `wait` seconds).
One writer per mirror (and per run folder: the trainer locks its folder first, training/run_folder.py, and both
refuse a second trainer in the same line, errors.another_writer). A trainer takes the lease at its start (a
conditional write: S3's If-None-Match or If-Match on the lease's ETag; elsewhere a compare-and-write under a file
lock) and renews it every quarter of `lease_seconds`. A second trainer stops in one line while the lease is live;
`--resume` takes over a stale one (no heartbeat for `lease_seconds`, or its process gone from this machine),
`--take-over` a live one. Taking over
also rewrites checkpoints.json, on which every writer's updates are conditional (S3), so a writer that was
taken over (a zombie instance back from the dead) has its next pointer update refused; it reads the lease
before every other upload too, and on finding another owner stops writing, says so in one line and ends the
run (StopPolicy). On other stores than S3 the pointer's condition is a read just before the write.

A store must honour those conditions for the lease to mean anything: on S3 the mirror checks at its start with
a probe object (a write that must be refused, 412) and refuses a store that applies it (GCS's S3 interface, MinIO
before 2024) in one line; `--no-lease` mirrors there without a lease, and so without its protection. A conditional
write whose reply was lost is retried by botocore with the same condition and refused (412) although it was
applied: the object is read back, and when it holds what this writer wrote, the write counts. A 409
(ConditionalRequestConflict: two conditional writes raced) is retried with backoff.

Credentials come from the environment or the provider's config files, never from the URL (refused), and are
never written: messages from the store are redacted. The names in the store are chosen by whoever can write
there: a restore refuses one that would be written outside the run folder (storage/urls.local_path), and a
pointer naming a key outside checkpoints/.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import torch

from ..errors import UserError, another_writer
from . import urls
from .atomic import write_atomic
from .verified import DamagedCopy, compressed_records, get_verified, put_verified, sha256_of

POINTER = "checkpoints.json"
FORMAT = "imagenet-resnet-mirror/1"
LEASE = "lease.json"
LEASE_FORMAT = "imagenet-resnet-lease/1"
LEASE_SECONDS = 120.0  # without a heartbeat for this long, a lease is stale (renewed every quarter of it)
READ_ATTEMPTS = 5  # reads of an object another writer may be rewriting at that moment (the lease, the pointer)
CONFLICT_ATTEMPTS, CONFLICT_FIRST_SECONDS = 5, 0.2  # a conditional write answered 409, tried again with backoff
CHECKPOINT_KEY = re.compile(r"checkpoints/[A-Za-z0-9_-][A-Za-z0-9._-]*")  # what a pointer may name: no ../
PROBE = ".conditional-write-probe-"  # + the writer's owner id: the object the start's check writes, then deletes
BOTOCORE_CONDITIONAL = "1.35.69"  # the first botocore whose put_object takes IfMatch
CHECKPOINTS = ("last.pt", "best.pt")  # uploaded through the pointer; previous.pt is the pointer's previous
SWEEP_SECONDS = 30.0
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 1.0, 60.0


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_size


def local_step(out_dir: Path) -> int | None:
    """The global step of the run folder's newest readable checkpoint (last.pt, else previous.pt), or None."""
    for name in ("last.pt", "previous.pt"):
        if compressed_records(out_dir / name):  # a zip bomb (storage.verified): not one of ours
            continue
        try:
            saved = torch.load(out_dir / name, map_location="cpu", weights_only=True, mmap=True)
            return int(saved["progress"]["global_step"])
        except Exception:  # missing or damaged: the resume says which, and falls back
            continue
    return None


class NoMirror:
    """What the trainer holds without --mirror (and on ranks other than 0): every call does nothing."""

    superseded: str | None = None

    def notify(self, path: Path, **meta) -> None:
        pass

    def report_to(self, log) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> "NoMirror":
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_mirror(url: str | None, out_dir: Path, resume: bool, is_main: bool, wait: float, take_over: bool = False,
                lease_seconds: float = LEASE_SECONDS, local_rank: int = 0, lease: bool = True) -> "Mirror | NoMirror":
    """The run's mirror (rank 0; the others get NoMirror), its lease taken (none with `lease` False: --no-lease).
    With `resume`, a run in the store newer than the run folder (or a run folder that is missing) is brought down
    first, on every node (by its first process: each node reads its own run folder). Under torchrun the caller
    makes every rank wait for that (training.distributed.on_every_rank: a refusal on one rank stops them all)."""
    mirror = Mirror(url, out_dir, wait, lease_seconds) if url and is_main else NoMirror()
    if isinstance(mirror, Mirror):
        if lease:
            mirror.take_lease(resume, take_over)
        else:
            mirror.go_without_lease(resume)
        mirror.restore(resume)
    elif url and resume and local_rank == 0:  # another node: a copy only, the writer is rank 0
        Mirror(url, out_dir, wait, lease_seconds).bring_down()
    return mirror


def _machine() -> str:
    """This machine since its last boot: a process id means something only there."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _process_gone(pid: int) -> bool:
    """Whether process `pid` of this machine has ended: no such process, or a zombie (killed, its exit status not
    yet collected: where nothing reaps orphans promptly, as in a container whose first process is not an init, a
    trainer killed with -9 stays one for seconds or for good)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # no /proc (macOS): alive, as os.kill said
    return state in ("Z", "X")


class LeaseChanged(Exception):
    """A conditional write found the object changed since it was read."""


def _answer(error: Exception) -> tuple[int | None, str]:
    """The HTTP status and S3 error code of a store's answer, as s3fs raises it (the botocore error its cause);
    (None, "") where no answer came (a connection refused or cut)."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code", "")


def _precondition_failed(error: Exception) -> bool:
    """A conditional PUT refused (HTTP 412), as s3fs raises it (FileExistsError for If-None-Match)."""
    status, code = _answer(error)
    return isinstance(error, FileExistsError) or status == 412 or code == "PreconditionFailed" \
        or "pre-condition" in str(error)


def _conflict(error: Exception) -> bool:
    """A 409 (ConditionalRequestConflict: another conditional write to the key raced this one): AWS says to try
    again."""
    return _answer(error)[0] == 409


class Mirror:
    def __init__(self, url: str, out_dir: Path, wait: float = 300.0, lease_seconds: float = LEASE_SECONDS):
        self.url = urls.check_url(url, "--mirror")
        self.fs, self.root = urls.filesystem(self.url)
        self.out_dir, self.wait, self.log = Path(out_dir), wait, print
        self.lease_seconds, self.generation, self.superseded = lease_seconds, 0, None
        self.conditional = True  # writes of the lease and the pointer conditional on the version last seen
        self.lease = {"format": LEASE_FORMAT, "owner": uuid.uuid4().hex, "machine": _machine(), "pid": os.getpid()}
        self._tags: dict[str, str | None] = {}  # lease.json / checkpoints.json -> the version this writer last saw
        self._next_heartbeat, self.lease_note = 0.0, ""
        self.pointer: dict = self._read_pointer()
        self.note = ""  # what the start did, for the run log
        self._pending: dict[str, float] = {}  # file name in the run folder -> when it is due (time.monotonic)
        self._versions: dict[str, tuple] = {}  # checkpoint name -> (stat key, meta) as announced
        self._uploaded: dict[str, tuple] = {}  # file name -> stat key of the version last uploaded
        self._busy: str | None = None
        self._cond = threading.Condition()
        self._retry_at, self._backoff, self._outage_since = 0.0, RETRY_FIRST_SECONDS, None
        self._next_sweep, self._draining, self._closing = 0.0, False, False
        self._thread = threading.Thread(target=self._run, name="mirror-upload", daemon=True)
        # The lease is renewed by a thread of its own: an upload that takes longer than the lease lasts (a large
        # checkpoint, a slow link) must not let it go stale under a live writer.
        self._lease_thread = threading.Thread(target=self._keep_lease, name="mirror-lease", daemon=True)

    # --- the store's layout ---------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read_pointer(self) -> dict:
        try:
            data, self._tags[POINTER] = self._read_tagged(POINTER)
            if data is None:
                return {}
            pointer = json.loads(data)
        except Exception as e:
            raise UserError(f"--mirror {self.url}: cannot read it ({urls.redact(str(e))}); check the URL, the "
                            "network and the credentials (AWS_* variables, AWS_PROFILE, AWS_ENDPOINT_URL)") from None
        if pointer.get("format") != FORMAT:
            raise UserError(f"--mirror {self.url}: its {POINTER} is not one of ours; pick another --mirror")
        for role, entry in pointer.items():
            # The mirror reads these keys and deletes them once replaced: one outside checkpoints/ (../ on a
            # local store reaches any file) would have it fetch or delete whatever the pointer's writer chose.
            if isinstance(entry, dict) and not CHECKPOINT_KEY.fullmatch(str(entry.get("key"))):
                raise UserError(f"--mirror {self.url}: its {POINTER} names {entry.get('key')!r} as the {role} "
                                f"checkpoint, not an object in checkpoints/; {urls.FOREIGN_NAME_FIX}")
        return pointer

    def _write_small(self, name: str, data: bytes) -> None:
        """One object, whole or not at all: an object store's PUT is; on a file system, write_atomic makes it so."""
        key = self._key(name)
        if not self._local():
            self.fs.pipe_file(key, data)
            return
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(data, key)

    def _local(self) -> bool:
        return "file" in self.fs.protocol

    def _s3(self) -> bool:
        return "s3" in self.fs.protocol

    # --- conditional writes: the lease and the pointer ------------------------------------------------------------

    def _read_tagged(self, name: str) -> tuple[bytes | None, str | None]:
        """An object's bytes and its version tag (S3's ETag, read in the same request; elsewhere a hash of the
        bytes); (None, None) when there is none."""
        key, attempt = self._key(name), 1
        while True:
            try:
                if not self._s3():
                    data = self.fs.cat_file(key)
                    return data, hashlib.sha256(data).hexdigest()
                self.fs.invalidate_cache(key)
                with self.fs.open(key, "rb") as f:
                    return f.read(), f.details.get("ETag")
            except FileNotFoundError:
                return None, None
            except OSError as e:  # s3fs reads with If-Match: rewritten between its HEAD and its GET, read it again
                if e.errno != errno.EBUSY or attempt == READ_ATTEMPTS:
                    raise
                attempt += 1

    @contextlib.contextmanager
    def _local_lock(self):
        """On a file system, compare-and-write under an exclusive lock beside the store's files."""
        if not self._local():
            yield
            return
        self.fs.makedirs(self.root, exist_ok=True)
        with open(f"{self.root}/.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_if(self, name: str, data: bytes) -> None:
        """Write `name` only if it is still the version this writer last saw (or still missing); LeaseChanged
        otherwise. S3 checks that itself (If-Match / If-None-Match); elsewhere it is a read just before."""
        seen = self._tags.get(name)
        if not self.conditional:  # --no-lease: nothing to fence, on a store that may not take conditions at all
            self._write_small(name, data)
            return
        if self._s3():
            condition = {"IfMatch": seen} if seen else {"IfNoneMatch": "*"}
            try:
                reply = self._put_if(self._key(name), data, condition)
            except OSError as e:
                if not _precondition_failed(e):
                    raise
                # Refused: by another writer's version, or by this one's, applied by a try whose reply was lost
                # (botocore tries again with the same condition). The store's version says which.
                found, tag = self._read_tagged(name)
                if found != data:
                    raise LeaseChanged(name) from None
                reply = {"ETag": tag}
            self.fs.invalidate_cache(self._key(name))
            self._tags[name] = reply.get("ETag")
            return
        with self._local_lock():
            if self._read_tagged(name)[1] != seen:
                raise LeaseChanged(name)
            self._write_small(name, data)
        self._tags[name] = hashlib.sha256(data).hexdigest()

    def _put_if(self, key: str, data: bytes, condition: dict) -> dict:
        """One conditional PUT, tried again with backoff while the store answers 409 (conditional writes racing:
        transient); the last 409 raised."""
        bucket, inner, _ = self.fs.split_path(key)
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return self.fs.call_s3("put_object", Bucket=bucket, Key=inner, Body=data, **condition)
            except OSError as e:
                if not _conflict(e) or attempt == CONFLICT_ATTEMPTS:
                    raise
            time.sleep(CONFLICT_FIRST_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))

    def _check_conditional_writes(self) -> None:
        """Refuse, in one line, a store that does not refuse the conditional writes it should: a probe object
        written, then written again under a condition that no longer holds (If-None-Match: * on an object that
        exists; If-Match on another version), each of which must be refused (412)."""
        from botocore.exceptions import ParamValidationError  # s3fs's own dependency, there with any s3:// URL

        probe = self._key(PROBE + self.lease["owner"])
        checks = (({"IfNoneMatch": "*"}, "If-None-Match: * on an object that exists"),
                  ({"IfMatch": '"' + "0" * 32 + '"'}, "If-Match with an ETag it does not have"))
        try:
            self._put_if(probe, b"probe", {"IfNoneMatch": "*"})
            for condition, what in checks:
                try:
                    self._put_if(probe, b"probe again", condition)
                    answer = "applied it"
                except OSError as e:
                    if _precondition_failed(e):
                        continue
                    status, code = _answer(e)
                    if status is None:
                        raise
                    answer = f"answered {status} {code}".rstrip()
                raise UserError(f"--mirror {self.url}: this store does not honour conditional writes (a PUT with "
                                f"{what} must be refused with 412; it {answer}), so the lease cannot keep a second "
                                "trainer out: use a store that honours them (AWS S3, MinIO since 2024, Cloudflare R2; "
                                "not GCS's S3 interface), or add --no-lease to mirror without a lease (then nothing "
                                "stops two trainers writing this mirror, nor fences a zombie instance that comes "
                                "back)")
        except ParamValidationError:
            import botocore

            raise UserError(f"--mirror {self.url}: botocore {botocore.__version__} cannot make the conditional writes "
                            f"the mirror's lease needs (IfMatch on put_object came with botocore {BOTOCORE_CONDITIONAL}"
                            f"); upgrade it: {urls.CLOUD_EXTRA.replace('pip install', 'pip install -U')}") from None
        finally:
            with contextlib.suppress(Exception):  # only tidying: a probe left behind is never read
                self.fs.rm_file(probe)

    def _store_error(self, error: Exception, doing: str) -> UserError:
        """What went wrong with the store at the start, in one line."""
        if _conflict(error):
            return UserError(f"--mirror {self.url}: the store answered 409 (ConditionalRequestConflict) to "
                             f"{CONFLICT_ATTEMPTS} conditional writes in a row while {doing}: another writer keeps "
                             "racing this one; stop any other trainer writing there, then start again")
        return UserError(f"--mirror {self.url}: cannot write there while {doing} ({urls.redact(str(error))}); check the "
                         "bucket, the permissions and the credentials")

    @staticmethod
    def _holder(lease: dict) -> str:
        age = max(time.time() - float(lease.get("heartbeat", 0)), 0)
        return (f"{str(lease.get('machine', '?')).split('/')[0]} (process {lease.get('pid')}, generation "
                f"{lease.get('generation')}, last heartbeat {age:.0f} s ago)")

    def _live(self, lease: dict | None) -> bool:
        """Whether someone's lease still holds the mirror."""
        if not lease or lease.get("released"):
            return False
        if lease.get("machine") == self.lease["machine"] and _process_gone(int(lease.get("pid", 0))):
            return False  # its process ended on this machine (killed, or a torchrun restart)
        return time.time() - float(lease.get("heartbeat", 0)) < self.lease_seconds

    def take_lease(self, resume: bool, take_over: bool) -> None:
        """Become the mirror's one writer, or stop in one line: while another trainer's lease is live, or where the
        store would not keep a second trainer out (it does not honour conditional writes), or cannot be written."""
        try:
            if self._s3():
                self._check_conditional_writes()
            self._take_lease(resume, take_over)
        except OSError as e:
            raise self._store_error(e, "taking its lease") from None

    def go_without_lease(self, resume: bool) -> None:
        """--no-lease: no lease taken nor checked, and the pointer written without a condition (a store that does not
        honour them may refuse them too): nothing keeps a second trainer out."""
        self._refuse_a_run_without_resume(resume)
        self.conditional = False
        self.lease_note = ("no lease (--no-lease): nothing stops a second trainer writing this mirror, nor fences a "
                           "zombie instance that comes back")

    def _refuse_a_run_without_resume(self, resume: bool) -> None:
        remote = self.pointer.get("last", {}).get("global_step")
        if remote is not None and not resume:
            raise UserError(f"--mirror {self.url} already holds a run (checkpoint at global step {remote}); add "
                            "--resume to continue it, or pick another --mirror")

    def _take_lease(self, resume: bool, take_over: bool) -> None:
        for attempt in range(READ_ATTEMPTS):  # a live holder renews it meanwhile: read it again and decide again
            data, self._tags[LEASE] = self._read_tagged(LEASE)
            held = json.loads(data) if data else None
            if self._live(held) and not take_over:
                stale = f"{self.lease_seconds:.0f} s without a heartbeat"
                raise another_writer(f"--mirror {self.url}", self._holder(held), "stop that one, or wait until its "
                                     f"lease is stale ({stale}), or add --take-over if it is gone for good")
            self._refuse_a_run_without_resume(resume)
            self.generation = int(held.get("generation", 0)) + 1 if held else 1
            try:
                self._heartbeat()
                break
            except LeaseChanged:
                continue
        else:
            raise UserError(f"--mirror {self.url}: its lease keeps changing hands; two trainers must never write one "
                            "mirror: stop the others")
        if held and not held.get("released"):
            self.lease_note = f"took over the lease from {self._holder(held)}; this trainer is generation {self.generation}"
        # Fencing: the pointer rewritten with the new generation, so a writer taken over has its next pointer
        # update refused (S3). A writer that updated it meanwhile makes this retry with what it wrote.
        for _ in range(10):
            self.pointer = self._read_pointer()
            if not self.pointer:
                return
            try:
                self._write_if(POINTER, json.dumps({**self.pointer, "generation": self.generation}, indent=1).encode())
                self.pointer["generation"] = self.generation
                return
            except LeaseChanged:
                continue
        raise UserError(f"--mirror {self.url}: its {POINTER} keeps changing: another trainer is still writing there")

    def _heartbeat(self) -> None:
        """Renew the lease (conditional on the version this writer wrote last)."""
        self.lease.update(generation=self.generation, heartbeat=time.time(), released=False)
        self._write_if(LEASE, json.dumps(self.lease, indent=1).encode())
        self._next_heartbeat = time.monotonic() + self.lease_seconds / 4

    def _still_the_writer(self, adopt: bool = False) -> bool:
        """Whether the lease is still this writer's; if not, stop writing for good and say so once. With `adopt`
        (the lease thread, after a renewal was refused), the version found becomes the one the next renewal is
        conditional on, when it is this writer's own (a write applied whose reply never came back)."""
        if not self.generation:  # opened without a lease (take_lease): nobody to lose it to
            return True
        if self.superseded is None:
            data, tag = self._read_tagged(LEASE)
            lease = json.loads(data) if data else {}
            if lease.get("owner") == self.lease["owner"]:
                if adopt:
                    self._tags[LEASE] = tag
                return True
            # Said by the trainer as it stops (StopPolicy), in one line.
            self.superseded = (f"mirror: {self.url} was taken over by another trainer on "
                               f"{str(lease.get('machine', '?')).split('/')[0]} (process {lease.get('pid')}, generation "
                               f"{lease.get('generation')}); this one (generation {self.generation}) stopped writing there")
            with self._cond:
                self._closing = True
                self._pending.clear()
                self._cond.notify_all()
        return False

    # --- restoring -------------------------------------------------------------------------------------------

    def restore(self, resume: bool) -> None:
        """Bring the run in the store down into the run folder when that is missing or older."""
        remote = self.pointer.get("last", {}).get("global_step")
        if remote is None:
            try:  # a store that cannot be written to is said now, not after hours of training
                self._write_if(POINTER, json.dumps({**self.pointer, "format": FORMAT, "generation": self.generation}).encode())
            except Exception as e:
                raise self._store_error(e, f"writing its {POINTER}") from None
            self.note = f"mirroring {self.out_dir} to {self.url}"
            return
        self.note = self.bring_down() + "; mirroring it there"

    def bring_down(self) -> str:
        """Download the run in the store when the run folder is missing or older; says what it did."""
        remote, local = self.pointer.get("last", {}).get("global_step"), local_step(self.out_dir)
        if remote is None:
            return f"{self.url} holds no checkpoint yet"
        if local is not None and local >= remote:
            return (f"the run folder {self.out_dir} (global step {local}) is as new as the mirror {self.url}'s "
                    f"(global step {remote}) or newer, so it continues from here")
        self.download_run()
        return (f"restored {self.out_dir} from {self.url} (checkpoint at global step {remote}"
                + (f"; the run folder's was at global step {local})" if local is not None else ")"))

    def download_run(self) -> None:
        """The run the pointer names, brought down into the run folder (checkpoints checked against it). Every name
        the store lists is checked first, those it skips too: one that would be written outside the run folder
        stops the restore before anything is written."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A key ending in / is a folder marker (a console's "create folder"), not a file.
        keys = [key for key in self.fs.find(self.root) if not key.endswith("/")]
        listed = {name: urls.local_path(self.out_dir, name, f"--mirror {self.url}: the object")
                  for name in (key[len(self.root):].strip("/") for key in keys)}
        # Not the store's own files (the pointer, the lease, .lock, the start's probe should one be left), nor an
        # object named as a checkpoint: those come from checkpoints/, checked against the pointer, never unchecked.
        not_restored = (POINTER, LEASE, "previous.pt", *CHECKPOINTS)
        others = {name: path for name, path in listed.items() if name not in not_restored
                  and not name.startswith(("checkpoints/", ".")) and not name.endswith(".tmp")}
        fetched: dict[str, Path] = {}  # SHA-256 -> the checkpoint brought down with it
        for role, name in (("last", "last.pt"), ("previous", "previous.pt"), ("best", "best.pt")):
            entry = self.pointer.get(role)
            if entry is None:
                continue
            if entry["sha256"] in fetched:  # best.pt is often last.pt: copied, not fetched again
                write_atomic(fetched[entry["sha256"]].read_bytes(), self.out_dir / name)
                self._uploaded[name] = _stat_key((self.out_dir / name).stat())
            else:
                self._download(entry["key"], self.out_dir / name, entry)
            fetched[entry["sha256"]] = self.out_dir / name
        for name, path in others.items():
            self._download(name, path)

    def _download(self, key: str, path: Path, expected: dict | None = None) -> None:
        """The object `key` as `path` in the run folder, written atomically; a checkpoint is checked against the
        pointer."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            get_verified(self.fs, self._key(key), path, expected["sha256"] if expected is not None else None)
        except DamagedCopy:
            raise UserError(f"--mirror {self.url}: {key} does not match the checksum {POINTER} gives; the store "
                            "holds a damaged copy: resume from the run folder, or from another copy") from None
        self._uploaded[path.relative_to(self.out_dir).as_posix()] = _stat_key(path.stat())  # in the store already

    # --- what the trainer calls ------------------------------------------------------------------------------

    def report_to(self, log) -> None:
        self.log = log
        log(f"mirror: {self.note}" + (f"; {self.lease_note}" if self.lease_note else ""))

    def notify(self, path: Path, **meta) -> None:
        """`path` in the run folder was just written: queue its upload (a checkpoint's `meta`: epoch and
        global_step). Takes no time: a stat and a lock."""
        name = Path(path).relative_to(self.out_dir).as_posix()
        if self.superseded:
            return
        with self._cond:
            if name in CHECKPOINTS:
                self._versions[name] = (_stat_key(os.stat(path)), meta)
                self._next_sweep = 0.0  # the logs go up with each checkpoint
            self._pending[name] = min(self._pending.get(name, time.monotonic()), time.monotonic())
            self._cond.notify_all()

    def __enter__(self) -> "Mirror":
        self._thread.start()
        if self.generation:  # a lease was taken (take_lease); a mirror opened without one has none to keep
            self._lease_thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is KeyboardInterrupt:  # a second Ctrl-C: quit now
            self._stop()
            return
        self._finish()

    # --- the uploading thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        self._collect_garbage(set())
        while True:
            name = self._next()
            if name is None:
                return
            try:
                self._upload(name)
            except Exception as e:  # the store: unreachable, refusing, or slow; the file stays queued
                self._failed(name, e)
            else:
                self._succeeded()
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _next(self) -> str | None:
        """The next file due (checkpoints first), sweeping the run folder when a sweep is due; None once closed."""
        while True:
            if time.monotonic() >= self._next_sweep:
                self._sweep()
            with self._cond:
                now = time.monotonic()
                due = [n for n, at in self._pending.items() if at <= now]
                if due and now >= self._retry_at:
                    name = min(due, key=lambda n: (n not in CHECKPOINTS, n != "last.pt", self._pending[n]))
                    del self._pending[name]
                    self._busy = name
                    return name
                if self._closing and not self._pending:
                    return None
                wake = min([self._next_sweep, *self._pending.values()])
                self._cond.wait(max(0.05, min(max(wake, self._retry_at) - now, SWEEP_SECONDS)))

    def _keep_lease(self) -> None:
        """Renew the lease every quarter of its life until the mirror closes or another trainer takes it; a renewal
        that failed is tried again at once (on the version read back, after a refusal), then after a backoff
        (doubling from a second, at most a quarter of the lease)."""
        retry = 0.0
        while True:
            with self._cond:
                if not self._closing:
                    self._cond.wait(max(0.05, self._next_heartbeat - time.monotonic()))
                if self._closing:
                    return
            if time.monotonic() < self._next_heartbeat:
                continue
            try:
                self._heartbeat()
                retry = 0.0
                continue
            except LeaseChanged:
                with contextlib.suppress(Exception):  # unreadable: tried again after the backoff
                    if not self._still_the_writer(adopt=True):
                        return  # taken over: said once, and nothing more is written
            except Exception:  # the store unreachable: the uploads say so
                pass
            self._next_heartbeat = time.monotonic() + min(retry, self.lease_seconds / 4)
            retry = max(RETRY_FIRST_SECONDS, 2 * retry)

    def _sweep(self) -> None:
        """Queue every file of the run folder that changed since its last upload."""
        found = {}
        try:
            for path in self.out_dir.rglob("*"):
                name = path.relative_to(self.out_dir).as_posix()
                if path.is_file() and not path.name.startswith(".") and name != "previous.pt":
                    try:
                        found[name] = _stat_key(path.stat())
                    except FileNotFoundError:  # replaced (a checkpoint) or removed since it was listed
                        continue
        except OSError:  # a folder removed while listed: the next sweep sees the run folder as it is then
            pass
        with self._cond:
            for name, key in found.items():
                if self._uploaded.get(name) != key and name not in self._pending and name != self._busy:
                    self._pending[name] = time.monotonic()
            self._next_sweep = time.monotonic() + SWEEP_SECONDS
            self._cond.notify_all()

    def _upload(self, name: str) -> None:
        path = self.out_dir / name
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # replaced or removed since it was queued: a newer version is announced
            return
        with f:
            key = _stat_key(os.fstat(f.fileno()))
            if not self._still_the_writer():  # a lease taken over: nothing more goes up from here
                return
            if name in CHECKPOINTS:
                self._upload_checkpoint(name, f, key)
            else:
                self._write_small(name, f.read())
        self._uploaded[name] = key

    def _upload_checkpoint(self, name: str, f, stat_key: tuple) -> None:
        announced, meta = self._versions.get(name, (None, {}))
        if announced is not None and announced != stat_key:
            return  # replaced since it was announced: the newer version's announcement follows
        if announced is None:  # found by a sweep (a run folder from before the mirror): read where it stands
            try:
                saved = torch.load(self.out_dir / name, map_location="cpu", weights_only=True, mmap=True)
                meta = {"epoch": saved["progress"]["epoch"], "global_step": saved["progress"]["global_step"]}
            except Exception:  # damaged: not worth a place in the store (the resume says what happened to it)
                return
            if _stat_key(os.stat(self.out_dir / name)) != stat_key:
                return  # replaced meanwhile: the new one is announced
        sha, size = sha256_of(f)
        entry = next((e for e in self.pointer.values() if isinstance(e, dict) and e.get("sha256") == sha), None)
        if entry is None:
            entry = {"key": f"checkpoints/{sha[:20]}.pt", "size": size, "sha256": sha}
            f.seek(0)
            self._put_checked(f, entry)
        self._point("last" if name == "last.pt" else "best", {**entry, **meta, "uploaded": time.time()})

    def _put_checked(self, f, entry: dict) -> None:
        """Upload, then read back: the object must have the size and the SHA-256 of the file."""
        put_verified(self.fs, f, self._key(entry["key"]), entry["size"], entry["sha256"])

    def _point(self, role: str, entry: dict) -> None:
        """Name `entry` in the pointer (the last checkpoint before it becomes `previous`), then delete the
        checkpoint objects nothing names any more."""
        pointer = {**self.pointer, "format": FORMAT}
        if role == "last" and pointer.get("last", {}).get("sha256") not in (None, entry["sha256"]):
            pointer["previous"] = pointer["last"]
        pointer[role] = entry
        try:
            self._write_if(POINTER, json.dumps(pointer, indent=1).encode())
        except LeaseChanged:  # rewritten by a trainer that took the lease over (or raced this one's read of it)
            if self._still_the_writer():
                self._read_pointer()  # its version tag: the next attempt is made on it
                raise OSError(f"{POINTER} changed in the store; writing it again") from None
            return
        dropped = {e["key"] for e in self.pointer.values() if isinstance(e, dict)}
        self.pointer = pointer
        self._collect_garbage(dropped)

    def _collect_garbage(self, candidates: set[str]) -> None:
        """Delete checkpoint objects the pointer does not name: `candidates`, or (empty) all there are."""
        named = {e["key"] for e in self.pointer.values() if isinstance(e, dict)}
        try:
            if not candidates:
                candidates = {k[len(self.root):].strip("/") for k in self.fs.find(self._key("checkpoints"))}
            for key in candidates - named:
                self.fs.rm(self._key(key))
        except Exception:  # only tidying: the next time does it
            pass

    # --- outages and the end -----------------------------------------------------------------------------------

    def _failed(self, name: str, error: Exception) -> None:
        with self._cond:
            self._pending.setdefault(name, time.monotonic())
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, RETRY_MAX_SECONDS if not self._draining else 5.0)
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
        if first:
            message = urls.redact(f"{type(error).__name__}: {error}").split("\n")[0][:300]
            self.log(f"mirror: warning: cannot upload {name} to {self.url} ({message}); training goes on, and the "
                     "uploads are retried")

    def _succeeded(self) -> None:
        with self._cond:
            self._backoff = RETRY_FIRST_SECONDS
            caught_up = self._outage_since is not None and not self._pending
            since = self._outage_since
            if caught_up:
                self._outage_since = None
        if caught_up:
            self.log(f"mirror: caught up with {self.url} after {time.monotonic() - since:.0f} s of failed uploads")

    def _idle(self, deadline: float) -> bool:
        """Wait until nothing is queued or uploading, or the deadline; whether everything is uploaded."""
        with self._cond:
            self._retry_at = min(self._retry_at, time.monotonic() + 1.0)
            while (self._pending or self._busy) and time.monotonic() < deadline and self._thread.is_alive():
                self._cond.wait(min(1.0, deadline - time.monotonic()))
            return not (self._pending or self._busy)

    def _finish(self) -> None:
        """Upload what is left, waiting at most `wait` seconds, and say how it ended; then give the lease up."""
        if self.superseded:
            self._stop()
            return
        deadline = time.monotonic() + self.wait
        self._draining = True
        self._sweep()
        if self._pending or self._busy:
            self.log(f"mirror: uploading {len(self._pending) + bool(self._busy)} files to {self.url} before exiting "
                     f"(waiting at most {self.wait:.0f} s)")
        if self._idle(deadline):
            step = self.pointer.get("last", {}).get("global_step")
            self.log(f"mirror: {self.url} is up to date (checkpoint at global step {step})")
            self._sweep()  # the log line just written
            self._idle(min(deadline + 30, time.monotonic() + 30))
        else:
            left = sorted(self._pending) + ([self._busy] if self._busy else [])
            self.log(f"mirror: warning: {', '.join(left)} not uploaded to {self.url} within {self.wait:.0f} s; it "
                     f"holds the checkpoint at global step {self.pointer.get('last', {}).get('global_step')}; run "
                     "again with --resume --mirror to upload the rest")
        self._stop()
        self.release()  # after the thread stopped: no heartbeat renews it behind this

    def release(self) -> None:
        """The lease given up as the process ends (at the mirror's end, or by a run refused before it began), so that
        a --resume can start at once (a trainer killed leaves it to go stale)."""
        if not self.generation:
            return
        self.lease["released"] = True
        try:
            self._write_if(LEASE, json.dumps(self.lease, indent=1).encode())
        except Exception:  # taken over meanwhile, or the store unreachable: it goes stale
            pass

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._pending.clear()
            self._cond.notify_all()
        for thread in (self._thread, self._lease_thread):
            if thread.is_alive():
                thread.join(timeout=1.0)
