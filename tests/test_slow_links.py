"""Slow and interrupted links to Redis, within what the leases allow: nobody looks dead,
no lease is lost, and every caller of a flight gets the one answer it stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer
from faultproxy import FaultProxy
from upstream import Upstream


async def test_a_slow_start_makes_no_live_holder_look_dead(
    redis_server: EmbeddedServer, make_dedup: Callable[..., Dedup]
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        proxy.latency(0.15)  # each way: every round trip takes 0.3 s
        dedup = make_dedup(
            url=proxy.url(), lock_timeout=2.0, heartbeat_interval=0.2, max_concurrent=20
        )

        async def value() -> int:
            await asyncio.sleep(0.05)
            return 1

        calls = [dedup.call(f"/slow-start/{i}", value, timeout=30) for i in range(60)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert outcomes == [1] * 60
        await dedup.aclose()


async def test_a_slow_link_within_the_lease_loses_no_lease(
    redis_server: EmbeddedServer, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        slow = make_dedup(url=proxy.url(), lock_timeout=1.5, heartbeat_interval=0.2)
        other = make_dedup(lock_timeout=1.5, heartbeat_interval=0.2)
        await slow.start()
        await other.start()

        async def fetch() -> str:
            async with httpx.AsyncClient() as client:
                reply = await client.get(f"{upstream.url}/value/slow-link?delay=2.5")
                return str(reply.json()["exec_id"])

        running = asyncio.create_task(slow.call("/slow-link", fetch, timeout=30))
        while upstream.hits("/value/slow-link") == 0:
            await asyncio.sleep(0.01)
        proxy.latency(0.15, jitter=0.05)  # round trips of 0.2-0.4 s: within a third of a lease
        joined = await other.call("/slow-link", fetch, timeout=30)
        assert await running == joined
        assert upstream.hits("/value/slow-link") == 1
        assert slow.stats()["lease_lost"] == 0
        await slow.aclose()


@pytest.mark.parametrize("persistence", [True, False])
async def test_every_caller_gets_the_stored_answer_across_a_quick_restart(
    persistence: bool,
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    upstream: Upstream,
) -> None:
    # With persistence the flight and its lease survive; without, the executor
    # re-establishes the flight it finished running meanwhile, and stores its answer.
    server = make_redis_server(persistence=persistence)
    config = {"lock_timeout": 3.0, "heartbeat_interval": 0.2, "socket_timeout": 1.0}
    executor, other = make_dedup(url=server.url, **config), make_dedup(url=server.url, **config)
    await executor.start()

    async def fetch() -> str:
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"{upstream.url}/value/restart-aof?delay=1.0")
            return str(reply.json()["exec_id"])

    here = [asyncio.create_task(executor.call("/restart-aof", fetch, timeout=30))]
    while upstream.hits("/value/restart-aof") == 0:
        await asyncio.sleep(0.01)
    there = [asyncio.create_task(other.call("/restart-aof", fetch, timeout=30))]
    await asyncio.sleep(0.6)
    server.kill()  # down as the run completes, for a while: storing it waits for Redis
    await asyncio.sleep(1.5)
    server.restart()
    answers = await asyncio.gather(*here, *there)
    assert len(set(answers)) == 1, answers  # one answer for every caller
    assert upstream.hits("/value/restart-aof") == 1
