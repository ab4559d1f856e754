"""An HTTP proxy on loopback in front of an S3 server (moto's), that fails as a cloud store does: the tests of
the mirror against a store that loses replies, is slow, answers 409/412/503, or ignores conditional writes.

    python tests/s3_fault_proxy.py --upstream http://127.0.0.1:PORT --port PORT2

Point a client at it with AWS_ENDPOINT_URL=http://127.0.0.1:PORT2. Each request is matched against the rules
in order; the first rule that matches and still has uses left acts on it, and the proxy records what it did.
Rules and the record are read and set over HTTP on the same port, under /_proxy/ (no S3 bucket name starts
with an underscore):

    PUT /_proxy/rules   a JSON list of rules, replacing the previous ones (and emptying the record)
    GET /_proxy/events  a JSON list: one entry per rule that acted ({"rule", "action", "method", "path",
                        "status": the store's answer where the request reached it, else the proxy's})

A rule: {"action": ..., "method": "PUT", "key": "lease.json" (the request's path ends with it), "when": "If-Match"
(a header the request carries), "times": N (acts on the first N matching requests; absent: on all), "skip": K
(lets the first K matching requests through first), and per action:}
- "drop": forward the request, and once the store has applied it (answered 2xx), close the connection without a
  byte of its reply: a reply lost on the way (a request the store refused passes, recorded as "pass", and does not
  count as a use);
- "delay": forward the request, and hold its reply for "seconds";
- "answer": answer "status" with the S3 error "code" without forwarding (409 ConditionalRequestConflict,
  412 PreconditionFailed, 503 SlowDown);
- "pass": forward the request and its reply unchanged (to count requests);
- "ignore_conditions": forward the request without its If-Match / If-None-Match headers: a store that ignores
  conditional writes (GCS's XML API on writes, MinIO before 2024).

The proxy is a process of its own (`FaultProxy` starts it in its own process group, and ends that group);
`moto_behind_proxy(bucket)` starts moto's standalone server the same way, with the proxy in front of it and this
process's AWS variables pointing at the proxy (tests/test_store_faults.py, benchmarks/store_faults.py).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

CONTROL = "/_proxy/"
CONDITIONS = ("if-match", "if-none-match")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class Rules:
    """The rules and the record of what they did, shared by the proxy's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.events: list[dict] = []

    def set(self, rules: list[dict]) -> None:
        with self.lock:
            self.rules = [{**rule, "seen": 0, "acted": 0} for rule in rules]
            self.events = []

    def match(self, method: str, path: str, headers) -> tuple[int, dict] | None:
        """The first rule acting on this request (its uses counted), with its index; None to pass it through."""
        key = path.split("?", 1)[0]
        with self.lock:
            for index, rule in enumerate(self.rules):
                if rule.get("method", method) != method or not key.endswith(rule.get("key", "")):
                    continue
                if rule.get("when") and rule["when"] not in headers:
                    continue
                rule["seen"] += 1
                if rule["seen"] <= rule.get("skip", 0):
                    continue
                if "times" in rule and rule["acted"] >= rule["times"]:
                    continue
                rule["acted"] += 1
                return index, rule
        return None

    def give_back(self, index: int) -> None:
        """A use of rule `index` that did not happen after all (a drop whose request the store refused)."""
        with self.lock:
            self.rules[index]["acted"] -= 1

    def record(self, index: int, rule: dict, method: str, path: str, status: int | None) -> None:
        with self.lock:
            self.events.append({"rule": index, "action": rule["action"], "method": method, "path": path,
                                "status": status, "time": time.time()})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    upstream: tuple[str, int]
    rules: Rules

    def log_message(self, *args) -> None:  # no line per request
        pass

    def _body(self) -> bytes:
        """The request's body as it came, chunked framing included (forwarded byte for byte: signed)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        line = self.rfile.readline()
                        raw += line
                        if line in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _control(self, body: bytes) -> None:
        if self.command == "PUT" and self.path == CONTROL + "rules":
            self.rules.set(json.loads(body))
            self._reply(200, {}, b"{}")
        elif self.command == "GET" and self.path == CONTROL + "events":
            with self.rules.lock:
                data = json.dumps(self.rules.events).encode()
            self._reply(200, {"Content-Type": "application/json"}, data)
        else:
            self._reply(404, {}, b"")

    def _reply(self, status: int, headers: dict, body: bytes, head: bool = False) -> None:
        self.send_response_only(status)
        for name, value in headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))) if head else str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, body: bytes, strip_conditions: bool) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if strip_conditions and name.lower() in CONDITIONS:
                    continue
                if name.lower() not in ("connection", "keep-alive", "proxy-connection"):
                    connection.putheader(name, value)
            connection.putheader("Connection", "close")
            connection.endheaders(body or None)
            response = connection.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            connection.close()

    def _handle(self) -> None:
        body = self._body()
        if self.path.startswith(CONTROL):
            self._control(body)
            return
        matched = self.rules.match(self.command, self.path, self.headers)
        rule = matched[1] if matched else {"action": "pass"}
        action = rule["action"]
        if action == "answer":
            code = rule.get("code", "InternalError")
            error = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code} (the fault '
                     f'proxy)</Message><RequestId>fault-proxy</RequestId></Error>').encode()
            self.rules.record(*matched, self.command, self.path, rule["status"])
            self._reply(rule["status"], {"Content-Type": "application/xml"}, error, head=self.command == "HEAD")
            return
        try:
            status, headers, data = self._forward(body, strip_conditions=action == "ignore_conditions")
        except OSError:  # the store not up yet (or gone): what a gateway in front of it answers
            self._reply(502, {}, b"")
            return
        if action == "drop" and not 200 <= status < 300:  # refused by the store: nothing applied, nothing to lose
            self.rules.give_back(matched[0])
            rule = {**rule, "action": "pass"}
            matched, action = (matched[0], rule), "pass"
        if matched:
            self.rules.record(*matched, self.command, self.path, status)
        if action == "drop":  # the store has applied it; its reply never reaches the client
            self.close_connection = True
            return
        if action == "delay":
            time.sleep(float(rule.get("seconds", 1.0)))
        self._reply(status, headers, data, head=self.command == "HEAD")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client gone mid-request (a trainer killed by a fault test) is expected: said nowhere; anything else
        as the standard library says it."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def serve(upstream: str, port: int) -> None:
    parts = urlsplit(upstream)
    Handler.upstream, Handler.rules = (parts.hostname, parts.port), Rules()
    server = Server(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"s3 fault proxy on http://127.0.0.1:{server.server_port} in front of {upstream}", flush=True)
    server.serve_forever()


class FaultProxy:
    """The proxy in a process of its own (its own process group, ended whole), in front of `upstream`."""

    def __init__(self, upstream: str):
        sys.path.insert(0, str(Path(__file__).parent))
        from helpers import free_port

        self.upstream, self.port = upstream, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "FaultProxy":
        self.process = subprocess.Popen([sys.executable, __file__, "--upstream", self.upstream, "--port",
                                         str(self.port)], stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.set_rules([])
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"the S3 fault proxy did not start (exit status {self.process.returncode})")
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def _call(self, method: str, name: str, body: bytes | None = None) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, CONTROL + name, body=body)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise OSError(f"the S3 fault proxy answered {response.status} to {method} {CONTROL}{name}")
            return data
        finally:
            connection.close()

    def set_rules(self, rules: list[dict]) -> None:
        """Replace the rules (and empty the record of what they did)."""
        self._call("PUT", "rules", json.dumps(rules).encode())

    def events(self) -> list[dict]:
        """What the rules did, in order."""
        return json.loads(self._call("GET", "events"))


TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIDSTOREFAULTS3X7", "AWS_SECRET_ACCESS_KEY": "store-faults-secret-5c2e"}


@contextlib.contextmanager
def moto_behind_proxy(bucket: str):
    """moto's standalone S3 server and the fault proxy in front of it, each a process in a process group of its own
    (ended whole); meanwhile this process's AWS variables point at the proxy, with test credentials (and botocore's
    default retries: the path a user's client takes), and `bucket` exists. Yields the proxy."""
    import s3fs

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import free_port

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    names = [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"]
    saved = {name: os.environ.get(name) for name in names}
    try:
        with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
                os.environ.pop(name, None)
            os.environ.update({**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
            s3fs.S3FileSystem.clear_instance_cache()  # none left bound to another endpoint
            fs, deadline = s3fs.S3FileSystem(skip_instance_cache=True), time.monotonic() + 60
            while True:
                try:
                    fs.mkdir(bucket)
                    break
                except OSError:  # moto still starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            yield proxy
    finally:
        os.killpg(moto.pid, signal.SIGKILL)
        moto.wait()
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the S3 server's URL (http://127.0.0.1:PORT)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(args.upstream, args.port)
