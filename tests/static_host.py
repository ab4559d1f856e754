"""A static host on loopback, as Hugging Face serves a Static Space: a folder's files, with the headers its README's
`custom_headers` asks for (cross-origin isolation, which WebAssembly threads need), every request logged.

    python static_host.py FOLDER PORT [--no-isolation]

Started by tests/test_static_space.py and benchmarks/static_space.py in a process group of its own.
"""

import functools
import http.server
import sys


def main() -> None:
    folder, port = sys.argv[1], int(sys.argv[2])
    isolated = "--no-isolation" not in sys.argv

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                          ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

        def end_headers(self):
            if isolated:
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Resource-Policy", "cross-origin")
            super().end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=folder))
    print(f"serving {folder} on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
