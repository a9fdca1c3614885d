"""Fixtures that build ``Dedup`` objects for tests (imported by conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dedupcall import Dedup

# Short leases and fast heartbeats: recovery paths run in about a second.
FAST = {
    "lock_timeout": 1.0,
    "heartbeat_interval": 0.2,
    "retry_delay": 0.05,
    "poll_interval": 0.5,
    "drain_timeout": 2.0,
}


@pytest.fixture
async def make_dedup(redis_url: str, namespace: str) -> AsyncIterator[Callable[..., Dedup]]:
    """``make_dedup(**config)``: a Dedup on the session server in this test's namespace
    (``url=``/``namespace=`` override); all are closed after the test."""
    made: list[Dedup] = []

    def make(url: str | None = None, namespace_: str | None = None, **config: Any) -> Dedup:
        dedup = Dedup(url or redis_url, namespace=namespace_ or namespace, **{**FAST, **config})
        made.append(dedup)
        return dedup

    yield make
    for dedup in made:
        await dedup.aclose()


@pytest.fixture
async def dedup(make_dedup: Callable[..., Dedup]) -> Dedup:
    """A started Dedup with fast test settings."""
    d = make_dedup()
    await d.start()
    return d
