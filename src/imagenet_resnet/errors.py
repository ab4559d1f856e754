"""The project's one exception for expected problems, and the one expected problem every writer meets."""

import errno
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over a file-size limit


class UserError(ValueError):
    """A problem with what the user gave (a path, a setting, a file) that they can fix: the command prints
    this one line and exits with status 2. Any other exception is a bug and keeps its traceback.
    A ValueError, so that callers which catch bad values also catch it."""


def disk_full(path: Path, error: OSError, again: str = "run the same command again (with --resume to continue a "
              "run)") -> UserError:
    return UserError(f"{path}: no room to write it ({error.strerror}); what was saved before is intact: free space "
                     f"on {Path(path).parent}, then {again}")
