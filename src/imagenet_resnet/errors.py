"""The project's one exception for expected problems, and the one expected problem every writer meets: a full
disk, said in one line (disk_full_said) wherever a file is written; and the one refusal of a second trainer
(another_writer)."""

import contextlib
import errno
import tempfile
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over a file-size limit


def printable(text: str) -> str:
    """`text` for a terminal or a one-line record: control characters (a line break, a tab, a terminal's escape)
    shown escaped, never acted on. Names from anyone's files and archives pass through here."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UserError(ValueError):
    """A problem with what the user gave (a path, a setting, a file) that they can fix: the command prints
    this one line and exits with status 2. Any other exception is a bug and keeps its traceback.
    A ValueError, so that callers which catch bad values also catch it."""


AGAIN = "run the same command again (with --resume to continue a run)"


def another_writer(place: str, holder: str, way_out: str) -> UserError:
    """The one refusal of a second trainer, whichever guard found the first: a run folder's lock
    (training/run_folder.py) or a mirror's lease (storage/mirror.py). `holder` names the trainer in the way."""
    return UserError(f"{place} is being written by another trainer on {holder}: two trainers must never write one "
                     f"run; {way_out}")


def disk_full(path: Path, error: OSError, again: str = AGAIN) -> UserError:
    return UserError(f"{path}: no room to write it ({error.strerror}); what was saved before is intact: free space "
                     f"on {Path(path).parent}, then {again}")


@contextlib.contextmanager
def disk_full_said(path: Path, again: str = AGAIN, name_the_failed_file: bool = False):
    """A full disk (no space, over quota, over a file-size limit) inside the block becomes one line naming
    `path` (or, with `name_the_failed_file`, the file the error names, if any) and what to do `again`."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            where = Path(e.filename) if name_the_failed_file and e.filename else path
            raise disk_full(where, e, again) from e
        raise


PROBE_ATTEMPTS = 5


def check_writable(folder: Path, option: str) -> Path:
    """Prove a file can be written in `folder` before any long work: a read-only mount or a folder of someone
    else's is one line naming `option`, not a traceback hours later. Trying a real write, not os.access: root
    passes every access check, and /proc or a read-only bind mount only refuses the write itself. Folders made
    for the probe are removed again, so a command refused later leaves nothing behind."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        with disk_full_said(folder, "run the same command again"):
            for attempt in range(PROBE_ATTEMPTS):
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
                        break
                except (FileNotFoundError, FileExistsError):
                    # Made and removed again meanwhile by another process's probe (torchrun's ranks all probe the same
                    # --out at once), unless a file is in the way for good.
                    if attempt == PROBE_ATTEMPTS - 1 or (folder.exists() and not folder.is_dir()):
                        raise
    except FileExistsError:
        raise UserError(f"{folder}: not a folder (a file of that name is in the way); give {option} a folder")
    except NotADirectoryError:
        raise UserError(f"{folder}: a file is in the way of this folder; give {option} a folder you can write to")
    except OSError as error:  # a full disk is said by disk_full_said, around this
        raise UserError(f"{folder}: cannot write there ({error.strerror}); give {option} a folder you can write to")
    finally:
        for made in missing:  # deepest first; only the empty folders this probe made
            try:
                made.rmdir()
            except OSError:
                break
    return folder
