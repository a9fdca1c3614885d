"""Shared fixtures: a real Redis, a real HTTP upstream, real child processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dedup_fixtures import dedup, make_dedup, make_sync_dedup  # noqa: F401  (fixtures)
from dedupcall.embedded import EmbeddedServer, EngineInfo, find_engine
from dedupcall.errors import EngineNotFound
from procs import Spawner
from upstream import Upstream


def pytest_report_header() -> str:
    try:
        engine = find_engine()
    except EngineNotFound as exc:
        return f"redis engine: none ({exc})"
    return f"redis engine: {engine.product} {engine.version} from {engine.source} ({engine.path})"


@pytest.fixture(scope="session")
def redis_engine() -> EngineInfo:
    """The server binary the whole run uses: DEDUPCALL_REDIS_SERVER, else one on PATH, else
    the embedded extra's Valkey."""
    return find_engine()


@pytest.fixture(scope="session")
def redis_server(redis_engine: EngineInfo) -> Iterator[EmbeddedServer]:
    """One server for the whole run, on a free port. Tests that kill, pause or restart
    Redis must use ``make_redis_server`` instead."""
    with EmbeddedServer(engine=redis_engine) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session server."""
    return redis_server.url


@pytest.fixture
def make_redis_server(redis_engine: EngineInfo) -> Iterator[Callable[..., EmbeddedServer]]:
    """Start extra servers of your own (``make_redis_server(persistence=True)``); all
    are stopped after the test. Takes ``EmbeddedServer``'s keyword arguments."""
    servers: list[EmbeddedServer] = []

    def make(**kwargs: Any) -> EmbeddedServer:
        kwargs.setdefault("engine", redis_engine)
        server = EmbeddedServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def _upstream_session() -> Iterator[Upstream]:
    with Upstream() as upstream:
        yield upstream


@pytest.fixture
def upstream(_upstream_session: Upstream) -> Upstream:
    """The session's HTTP upstream with its counters and scripts reset for this test."""
    _upstream_session.reset()
    return _upstream_session


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    """Start real Python child processes: ``spawn("child.py", arg, ...)`` or
    ``spawn.module("dedupcall.cli", "worker")``. All are killed after the test."""
    spawner = Spawner()
    yield spawner
    spawner.close()
