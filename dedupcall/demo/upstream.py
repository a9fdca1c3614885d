"""A slow local API that counts how often it is really called: the demo's upstream, and
the examples'."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Upstream(ThreadingHTTPServer):
    """A slow third-party API on a free loopback port that counts how often it is really
    called: every GET and POST is answered with JSON after ``delay`` seconds.

    ``with Upstream(0.2) as upstream:`` serves it from a thread; ``upstream.url`` is its
    base URL, ``upstream.hits["GET /api/users/1"]`` the hits of one method and path."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def total(self, method: str = "GET") -> int:
        """All hits of one method."""
        with self.lock:
            return sum(n for what, n in self.hits.items() if what.startswith(method + " "))

    def describe(self, prefix: str) -> str:
        """The hits of every method and path that starts with ``prefix``: ``GET /a x1, ...``."""
        with self.lock:
            hits = sorted((what, n) for what, n in self.hits.items() if what.startswith(prefix))
        return ", ".join(f"{what} x{n}" for what, n in hits)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that went away (the demo interrupted, a timeout) is not an error here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __enter__(self) -> Upstream:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.hits[f"{self.command} {self.path}"] += 1
        time.sleep(self.server.delay)
        body = json.dumps({"method": self.command, "path": self.path, "at": time.time()})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass
