"""A real local HTTP upstream for tests, served from a background thread of the test process.

Every test (and every child process it starts) reaches it over real loopback sockets.
It counts what it receives, so tests can prove how many times an upstream really ran.

Behaviour is chosen by the request itself, so child processes need no setup:

- ``/<any path>?delay=0.2&status=503&retry_after=1`` answers JSON
  ``{"path": ..., "hit": n, "exec_id": "<uuid4 hex>"}`` after ``delay`` seconds, with
  ``status`` (default 200) and an optional ``Retry-After`` header. ``hit`` is the n-th
  request of that path since the last ``reset()``. ``h_<name>=<value>`` adds a response
  header (``h_cache-control=private``); ``echo_header=<name>`` puts that request
  header's value in the body as ``echo``.
- a path given a script with ``Upstream.script(path, [503, 503, 200])`` answers those
  statuses in turn (the last one repeats), overriding ``status=``.
- ``/bytes/<n>`` answers ``n`` pseudo-random bytes, the same ones every time
  (``?chunked=1``: in chunks, without ``Content-Length``).
- ``/echo`` answers the method, query, headers and body it received.
- ``/_stats`` answers the counters as JSON (and is not counted itself).

Methods: GET, HEAD, POST, PUT, DELETE.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

STATS_PATH = "/_stats"


@dataclass
class _Step:
    status: int
    retry_after: str | None


@dataclass
class _State:
    """Counters shared by the handler threads; every access holds ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: Counter[str] = field(default_factory=Counter)
    inflight: Counter[str] = field(default_factory=Counter)
    peaks: Counter[str] = field(default_factory=Counter)
    inflight_total: int = 0
    peak_total: int = 0
    generation: int = 0
    order: list[str] = field(default_factory=list)
    scripts: dict[str, list[_Step]] = field(default_factory=dict)

    def enter(self, path: str) -> tuple[int, _Step | None, int]:
        """Count a request arriving; return its hit number, its scripted step, if any, and
        the generation (reset count) it belongs to."""
        with self.lock:
            self.hits[path] += 1
            self.order.append(path)
            self.inflight[path] += 1
            self.inflight_total += 1
            self.peaks[path] = max(self.peaks[path], self.inflight[path])
            self.peak_total = max(self.peak_total, self.inflight_total)
            steps = self.scripts.get(path)
            step = None
            if steps:
                # The last step repeats forever.
                step = steps.pop(0) if len(steps) > 1 else steps[0]
            return self.hits[path], step, self.generation

    def leave(self, path: str, generation: int) -> None:
        with self.lock:
            if generation == self.generation:  # a previous test's request no longer counts
                self.inflight[path] -= 1
                self.inflight_total -= 1

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.order.clear()
            self.scripts.clear()
            # Requests still running (a previous test's, e.g. a killed process's) are
            # forgotten: counts and peaks start from zero for the next test.
            self.generation += 1
            self.inflight.clear()
            self.inflight_total = 0
            self.peaks.clear()
            self.peak_total = 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "total": sum(self.hits.values()),
                "hits": dict(self.hits),
                "peak": self.peak_total,
                "peaks": dict(self.peaks),
                "inflight": self.inflight_total,
                "order": list(self.order),
            }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 makes bursts of connections wait a SYN retry (1 s).
    request_queue_size = 1024
    state: _State

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or cancel drop connections mid-response; that's expected.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real upstreams do

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        body = self._read_body()
        if url.path == STATS_PATH:
            self._reply(200, json.dumps(self.server.state.snapshot()).encode())
            return
        state = self.server.state
        hit, step, generation = state.enter(url.path)
        try:
            self._answer(url.path, query, body, hit, step)
        finally:
            state.leave(url.path, generation)

    def _answer(
        self, path: str, query: dict[str, str], body: bytes, hit: int, step: _Step | None
    ) -> None:
        delay = float(query.get("delay", 0))
        if delay > 0:
            time.sleep(delay)
        if path.startswith("/bytes/"):
            size = int(path.removeprefix("/bytes/"))
            data = random.Random(size).randbytes(size)
            if query.get("chunked"):
                self._reply_chunked(data)
            else:
                self._reply(200, data, content_type="application/octet-stream")
            return
        if path == "/echo":
            echoed = {
                "method": self.command,
                "path": path,
                "query": query,
                "headers": dict(self.headers.items()),
                "body": body.decode("utf-8", "replace"),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            self._reply(200, json.dumps(echoed).encode())
            return
        status = int(query.get("status", 200))
        retry_after = query.get("retry_after")
        if step is not None:
            status, retry_after = step.status, step.retry_after
        payload = {"path": path, "hit": hit, "exec_id": uuid.uuid4().hex}
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        # ?h_cache-control=private&h_set-cookie=sid%3D1: response headers of the caller's choice
        headers.update({k[2:]: v for k, v in query.items() if k.startswith("h_")})
        if "echo_header" in query:  # the value of one request header, in the body
            payload["echo"] = self.headers.get(query["echo_header"])
        self._reply(status, json.dumps(payload).encode(), headers=headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            # httpx streams bodies of unknown length in chunks (e.g. from a generator).
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply_chunked(self, data: bytes, chunk: int = 4096) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(data), chunk):
            part = data[i : i + chunk]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def _reply(
        self,
        status: int,
        data: bytes,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class Upstream:
    """The test upstream. ``with Upstream() as up: httpx.get(up.url + "/value/1")``."""

    def __init__(self) -> None:
        self._state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        if self._server is None:
            raise RuntimeError("Upstream is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> str:
        """Listen on a free loopback port and serve from a daemon thread; return the URL."""
        if self._server is None:
            server = _Server(("127.0.0.1", 0), _Handler)
            server.state = self._state
            self._server = server
            # A short poll interval only makes stop() quick; requests don't wait for it.
            self._thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name="test-upstream", daemon=True
            )
            self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Upstream:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def hits(self, path: str | None = None) -> int:
        """Requests received for ``path`` (or in total) since the last ``reset()``."""
        with self._state.lock:
            return self._state.hits[path] if path is not None else sum(self._state.hits.values())

    def peak(self, path: str | None = None) -> int:
        """The largest number of requests that were in flight at once (for ``path``, or all)."""
        with self._state.lock:
            return self._state.peaks[path] if path is not None else self._state.peak_total

    @property
    def order(self) -> list[str]:
        """The paths received, in arrival order."""
        with self._state.lock:
            return list(self._state.order)

    def stats(self) -> dict[str, Any]:
        """The same counters as the ``/_stats`` endpoint."""
        return self._state.snapshot()

    def reset(self) -> None:
        """Forget hits, order, peaks and scripts."""
        self._state.reset()

    def script(
        self,
        path: str,
        statuses: Sequence[int],
        retry_after: float | str | Sequence[float | str | None] | None = None,
    ) -> None:
        """Answer the next requests of ``path`` with ``statuses`` in turn; the last repeats.

        ``retry_after`` is one ``Retry-After`` value for every step, or one per step
        (``None`` for no header).
        """
        if not statuses:
            raise ValueError("script needs at least one status")
        if retry_after is None or isinstance(retry_after, (int, float, str)):
            per_step: list[float | str | None] = [retry_after] * len(statuses)
        else:
            per_step = list(retry_after)
            if len(per_step) != len(statuses):
                raise ValueError("retry_after needs one value per status")
        steps = [
            _Step(int(status), None if after is None else _header_value(after))
            for status, after in zip(statuses, per_step, strict=True)
        ]
        with self._state.lock:
            self._state.scripts[path] = steps


def _header_value(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
