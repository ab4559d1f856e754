"""A loopback stand-in for a cloud's instance metadata service, for `train --spot-notice` in the tests and
benchmarks/faults.py: AWS's IMDSv2 (a session token from PUT /latest/api/token, required on every GET, as AWS
requires it) and GCP's preempted flag (Metadata-Flavor: Google required). `preempted` switches both to
announcing a notice.

Two settings play a container on EC2 behind a bridge, one hop further than the metadata response's hop limit of
1: `put_hangs`, the token's reply never arrives (its IP TTL runs out on the way), while GETs still do; and
`imdsv1`, tokenless GETs answered too (the instance's http-tokens "optional"; by default "required": 401)."""

from __future__ import annotations

import http.server
import json
import secrets
import threading

AWS_NOTICE = {"action": "terminate", "time": "2026-12-02T08:22:00Z"}


class MetadataServer:
    """Serves on 127.0.0.1 in a thread of this process; `url` is its base address. Records each request as
    (method, path, answered status) in `requests`."""

    def __init__(self):
        self.preempted = False
        self.put_hangs = False
        self.imdsv1 = False
        self.tokens: set[str] = set()  # the tokens still valid; revoke_tokens() makes the next GET a 401
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # releases the PUTs left hanging
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval: shutdown() waits for one, and the tests start many servers.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def revoke_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def statuses(self, method: str, path: str) -> list[int]:
        with self._lock:
            return [status for m, p, status in self.requests if (m, p) == (method, path)]

    def __enter__(self) -> "MetadataServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


def _handler_for(server: MetadataServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the tests read `requests` instead
            pass

        def _answer(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
            with server._lock:
                server.requests.append((self.command, self.path, status))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):
            if self.path != "/latest/api/token":
                return self._answer(404)
            if server.put_hangs:  # recorded as status 0: never answered
                with server._lock:
                    server.requests.append((self.command, self.path, 0))
                server._closing.wait()
                self.close_connection = True
                return
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "").isdigit():
                return self._answer(400)  # AWS refuses a token request without its lifetime
            token = secrets.token_urlsafe(16)
            with server._lock:
                server.tokens.add(token)
            self._answer(200, token.encode())

        def do_GET(self):
            if self.path.startswith("/latest/"):
                with server._lock:
                    token = self.headers.get("X-aws-ec2-metadata-token")
                    valid = token in server.tokens or (token is None and server.imdsv1)
                if not valid:
                    return self._answer(401)
                if self.path == "/latest/meta-data/spot/instance-action" and server.preempted:
                    return self._answer(200, json.dumps(AWS_NOTICE).encode(), "application/json")
                if self.path == "/latest/meta-data/":
                    return self._answer(200, b"ami-id\ninstance-id\nspot/\n")
                return self._answer(404)
            if self.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._answer(403)
                return self._answer(200, b"TRUE" if server.preempted else b"FALSE")
            self._answer(404)

    return Handler
