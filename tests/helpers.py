"""Helpers the tests share, which the benchmarks import too (benchmarks/*.py put tests/ on sys.path; nothing
here imports a benchmark):

- `free_port()`: a free TCP port on 127.0.0.1;
- `start_server(command, port, log)` / `stop(process)`: a server process started and waited for until its
  /api/health answers, and stopped (`imagenet-resnet serve` in tests/test_serve.py and benchmarks/load_serve.py);
- `png_header(width, height)`: a PNG claiming a size it does not hold, the shape of a decompression bomb;
- `CHROMIUM`, `CHROMIUM_FLAGS`: Debian's Chromium as the browser tests launch it through Playwright;
- `hosted(folder)` / `page_answer(page, name)`: a Static Space served from loopback, and its page's answer
  (tests/test_static_space.py and benchmarks/static_space.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data: the shape of a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def start_server(command: list[str], port: int, log: Path, cwd: Path | None = None, env: dict | None = None,
                 timeout: float = 180, new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """Start a server process (its output into `log`) and wait until its /api/health answers. `new_session`: in
    a process group of its own, which os.killpg(process.pid, ...) ends whole."""
    import httpx  # imported here so that the tests can import this file where httpx is missing

    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                   start_new_session=new_session)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"no answer from {url}/api/health within {timeout:.0f} s:\n{Path(log).read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's: no downloaded browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def hosted(folder: Path):
    """`folder` served by tests/static_host.py on a loopback port, with the headers a Static Space's README asks
    for; its URL. The server runs in a process group of its own, ended whole after."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("static_host.py")), str(folder),
                                str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        yield "http://" + process.stdout.readline().split("http://")[1].strip()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def page_answer(page, name: str, timeout_ms: float = 120_000) -> tuple[dict, str]:
    """The Static Space page's answer for the image `name` (lastAnswer()) and its status line, once it has one;
    an AssertionError with the page's message when it refused the image instead."""
    page.wait_for_function("([name]) => document.body.dataset.state === 'error' || (document.body.dataset.state === "
                           "'answered' && document.getElementById('status').textContent.startsWith(name + ':'))",
                           arg=[name], timeout=timeout_ms)
    status = page.locator("#status").inner_text()
    assert page.evaluate("document.body.dataset.state") == "answered", status
    return page.evaluate("lastAnswer()"), status
