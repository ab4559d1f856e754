"""Files that are not on this machine: any fsspec URL (s3://bucket/prefix, gs://..., file://...).

fsspec (and s3fs for S3) are imported only when a URL needs them (`pip install "imagenet-resnet[cloud]"`).
Credentials and endpoints come the standard way, from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL for an S3-compatible store) or the
provider's config files; never from the URL, so that a URL can be logged and saved as it is.
"""

from __future__ import annotations

import bisect
import os
import re
import unicodedata
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError

CLOUD_EXTRA = 'pip install "imagenet-resnet[cloud]"'
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS",
                    "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_USER_INFO = re.compile(r"(?<=://)[^/\s@]+@")  # the user:password@ of a URL in a message
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DRIVE = re.compile(r"^[a-zA-Z]:")  # C:\x, C:/x, C:x: a Windows path, never a name a store should hand out
FOREIGN_NAME_FIX = "remove that object from the store: whoever can write there could write on this machine"
STORE_CREDENTIALS = "give them the standard way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"


def is_url(path) -> bool:
    """A URL with a scheme (s3://, gs://, file://), as opposed to a local path."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def check_url(url: str, what: str | None = None, credentials: str = STORE_CREDENTIALS) -> str:
    """The URL without a trailing slash; one holding credentials (user:password@) is refused, in a message
    that does not repeat them and says where they go instead (`credentials`: a store's by default)."""
    parts = urlsplit(url)
    if parts.username or parts.password or "@" in parts.netloc:
        what = what or f"{parts.scheme}://...@{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"
        raise UserError(f"{what}: the URL holds credentials (user:password@); remove them and {credentials}")
    return url.rstrip("/")


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL."""
    check_url(url)
    try:
        import fsspec.core
    except ImportError:
        raise UserError(f"{url}: reading or writing a URL needs fsspec (and s3fs for s3://): {CLOUD_EXTRA}") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec knows the protocol but its implementation (s3fs, gcsfs) is missing
        raise UserError(f"{url}: {e}".split("\n")[0] + f" ({CLOUD_EXTRA} for s3://)") from None
    except ValueError as e:
        raise UserError(f"{url}: not a URL fsspec can open ({e})") from None


def join(base: str | Path, *names: str) -> str | Path:
    if not is_url(base):
        return Path(base).joinpath(*names)
    return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])


def name(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _not_plain(name: str) -> str | None:
    """Why `name` is not a plain relative name (parts separated by single slashes), or None when it is one."""
    if not name:
        return "an empty name"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "a NUL or control character"
    if "\\" in name:
        return "a backslash"
    if name.startswith("/") or _DRIVE.match(name):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a '..' part"
    if "" in parts or "." in parts:
        return "an empty or '.' part"
    return None


def local_path(root: Path, name: str, source: str) -> Path:
    """root/name for a name that came from a store (a key under a URL, or a name in a file fetched from one), or a
    one-line refusal naming `source` (what handed out the name, said before it) unless it stays inside root once
    resolved: a name is data anyone who can write the store chooses, and must not let them write elsewhere on this
    machine. Symlinks already in root are followed in the check, so none leads a write out of it."""
    why = _not_plain(name)
    path = Path(root) / name
    if why is None:
        inside = Path(root).resolve()
        resolved = path.resolve()
        if resolved == inside or not resolved.is_relative_to(inside):
            why = f"through a symlink, to {resolved}"
    if why is not None:
        raise UserError(f"{source} {name!r} would be written outside {root} ({why}); {FOREIGN_NAME_FIX}")
    return path


def exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, inner = filesystem(path)
    return fs.exists(inner)


def size(path: str | Path) -> int:
    if not is_url(path):
        return Path(path).stat().st_size
    fs, inner = filesystem(path)
    return int(fs.size(inner))


def list_names(url: str) -> list[str]:
    """Names directly inside a URL 'folder' (files and folders), sorted; [] where there is nothing."""
    fs, inner = filesystem(url)
    try:
        return sorted(name(p) for p in fs.ls(inner, detail=False))
    except FileNotFoundError:
        return []


def read_bytes(path: str | Path) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def open_read(path: str | Path, block_size: int = 8 << 20):
    """A seekable binary file object; for a URL, one that reads ahead `block_size` bytes per request."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open(inner, "rb", block_size=block_size, cache_type="readahead")


def read_range(path: str | Path, start: int, end: int) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return os.pread(f.fileno(), end - start, start)
    fs, inner = filesystem(path)
    return fs.cat_file(inner, start=start, end=end)


def read_ranges(url: str, starts: list[int], ends: list[int], max_gap: int = 64 << 10,
                max_block: int = 32 << 20) -> list[bytes | Exception]:
    """The byte ranges [start, end) of one URL, fetched concurrently; ranges less than `max_gap` apart are
    fetched as one request, so that reading in storage order streams. A range that failed is its exception."""
    from fsspec.utils import merge_offset_ranges

    fs, inner = filesystem(url)
    _, block_starts, block_ends = merge_offset_ranges([inner] * len(starts), list(starts), list(ends),
                                                      max_gap=max_gap, max_block=max_block, sort=True)
    blocks = fs.cat_ranges([inner] * len(block_starts), block_starts, block_ends, on_error="return")
    found = []
    for start, end in zip(starts, ends):
        k = bisect.bisect_right(block_starts, start) - 1  # the merged block holding this range
        block = blocks[k]
        found.append(block if isinstance(block, Exception) else block[start - block_starts[k]: end - block_starts[k]])
    return found


def redact(text: str) -> str:
    """`text` with the values of credential variables of this environment, and the user:password@ of any URL,
    blanked out: for every line a message, a log or an error writes (a store's or a tracker's error may quote
    either)."""
    for variable in SECRET_VARIABLES:
        value = os.environ.get(variable, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _USER_INFO.sub("***@", text)
