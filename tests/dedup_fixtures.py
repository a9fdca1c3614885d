"""Fixtures that build ``Dedup`` objects for tests (imported by conftest)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer

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


class Blocker:
    """A call that holds one ``max_concurrent`` slot until ``release()``."""

    def __init__(self, dedup: Dedup, key: str, priority: int) -> None:
        self.gate = asyncio.Event()

        async def hold() -> int:
            await self.gate.wait()
            return 1

        self.key = key
        self.task = asyncio.create_task(dedup.call(key, hold, priority=priority))

    async def release(self) -> object:
        """Let the call finish; returns its value."""
        self.gate.set()
        return await self.task


async def hold_slot(dedup: Dedup, key: str = "/blocker", priority: int = 0) -> Blocker:
    """Start a call that occupies a slot, and return once it is running."""
    blocker = Blocker(dedup, key, priority)
    for _ in range(500):
        item = await dedup.get_flight_by_key(key)
        if item is not None and item.state == "running":
            return blocker
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} never started running")


@pytest.fixture
def make_sync_dedup(redis_url: str, namespace: str) -> Iterator[Callable[..., Dedup]]:
    """``make_dedup`` for sync tests: not started (the first sync call starts its private
    loop thread); each is closed with ``close()`` after the test."""
    made: list[Dedup] = []

    def make(url: str | None = None, **config: Any) -> Dedup:
        dedup = Dedup(url or redis_url, namespace=namespace, **{**FAST, **config})
        made.append(dedup)
        return dedup

    yield make
    for dedup in made:
        dedup.close()


async def lose_data(server: EmbeddedServer, how: str) -> None:
    """Make Redis lose everything: ``"restart"`` (kill, no persistence) or ``"flushdb"``."""
    if how == "restart":
        server.kill()
        server.restart()
    else:
        client = aioredis.Redis.from_url(server.url)
        await client.flushdb()
        await client.aclose()
