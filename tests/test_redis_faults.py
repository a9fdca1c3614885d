"""Redis itself fails: restart without persistence, outage, a dropped subscriber."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dedupcall import Dedup, RedisUnavailable
from dedupcall.embedded import EmbeddedServer

FAULTY = {"socket_timeout": 1.0, "lock_timeout": 1.0, "poll_interval": 0.3}


async def test_redis_restart_mid_flight_every_waiter_answered(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    server = make_redis_server()
    a, b = make_dedup(url=server.url, **FAULTY), make_dedup(url=server.url, **FAULTY)
    runs = 0

    async def slow() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.6)
        return "value"

    await b.start()  # connected before the fault: a call made during it fails fast
    first = [asyncio.create_task(a.call("/restart", slow, timeout=20)) for _ in range(10)]
    while runs == 0:
        await asyncio.sleep(0.01)
    second = [asyncio.create_task(b.call("/restart", slow, timeout=20)) for _ in range(10)]
    # b's callers have joined (both instances hold the flight) before Redis goes away.
    while (item := await a.get_flight_by_key("/restart")) is None or item.waiters < 2:
        await asyncio.sleep(0.01)
    server.kill()  # everything in Redis is lost (no persistence)
    await asyncio.sleep(0.3)
    server.restart()
    values = await asyncio.gather(*first, *second)
    assert values == ["value"] * 20
    assert runs <= 2  # at most one re-execution per in-flight key
    # the instances are alive again: a new call works normally
    assert await a.call("/after-restart", slow) == "value"


async def test_redis_down_gives_typed_error_within_timeout(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    server = make_redis_server()
    dedup = make_dedup(url=server.url, **FAULTY)
    await dedup.start()
    server.kill()

    async def f() -> int:
        return 1

    start = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await dedup.call("/down", f, timeout=5)
    with pytest.raises(RedisUnavailable):
        await dedup.add_get_request("/down", "http://127.0.0.1:1/")
    assert time.monotonic() - start < 5


async def test_unreachable_redis_at_start_is_a_typed_error(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(url="redis://127.0.0.1:1/0", socket_timeout=0.5)

    async def f() -> int:
        return 1

    with pytest.raises(RedisUnavailable):
        await dedup.call("/x", f)


async def test_killed_subscriber_connection_loses_no_wakeup(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    import redis.asyncio as aioredis

    server = make_redis_server()
    a, b = (
        make_dedup(url=server.url, poll_interval=30.0),
        make_dedup(url=server.url, poll_interval=30.0),
    )
    await a.start()
    await b.start()
    gate = asyncio.Event()

    async def held() -> int:
        await gate.wait()
        return 5

    executing = asyncio.create_task(a.call("/pub-lost", held))
    while a.worker.executing == 0:
        await asyncio.sleep(0.005)
    waiter = asyncio.create_task(b.call("/pub-lost", held))
    while not b._by_id:
        await asyncio.sleep(0.005)
    admin: Any = aioredis.Redis.from_url(server.url)
    await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    gate.set()  # the done message is published while b's subscriber is gone
    start = time.monotonic()
    assert await asyncio.wait_for(waiter, 10) == 5
    assert (
        time.monotonic() - start < 5
    )  # far below the 30 s safety poll: the resubscribe re-checked
    assert await executing == 5
    assert b.stats()["reconnects"] >= 1
    await admin.aclose()


async def test_out_of_memory_is_a_typed_error_and_recovers(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    import redis.asyncio as aioredis

    server = make_redis_server(
        extra_args=["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]
    )
    dedup = make_dedup(url=server.url, **FAULTY)
    await dedup.start()
    admin: Any = aioredis.Redis.from_url(server.url)
    filler = []
    with pytest.raises(Exception, match="maxmemory"):
        for i in range(200):  # fill the server up to its limit
            await admin.set(f"filler:{i}", b"x" * 100_000)
            filler.append(f"filler:{i}")

    async def f() -> int:
        return 1

    # Redis lets a script that started under the limit write on; where the server refuses,
    # the caller gets a typed error. Never an untyped one, never a hang.
    try:
        assert await dedup.call("/oom", f, timeout=5) == 1
    except RedisUnavailable as exc:
        assert "OutOfMemory" in str(exc) or "maxmemory" in str(exc)
    await admin.delete(*filler)
    assert await dedup.call("/oom-after", f, timeout=5) == 1  # nothing half-done was left
    await admin.aclose()


async def test_a_spell_at_maxmemory_makes_no_live_instance_look_dead(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    import redis.asyncio as aioredis

    from dedup_fixtures import hold_slot

    server = make_redis_server()
    config = {"max_concurrent": 1, "lock_timeout": 1.0, "heartbeat_interval": 0.2}
    a, b = make_dedup(url=server.url, **config), make_dedup(url=server.url, **config)
    blocker = await hold_slot(a)

    async def value() -> str:
        return "ok"

    queued = asyncio.create_task(b.call("/after-oom", value, timeout=20))
    while (item := await b.get_flight_by_key("/after-oom")) is None or item.waiters != 1:
        await asyncio.sleep(0.01)
    admin = aioredis.Redis.from_url(server.url)
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", 1)  # every write refused: no heartbeat, no renewal
    await asyncio.sleep(1.5)  # longer than an instance counts as alive, or a lease
    await admin.config_set("maxmemory", 0)
    await admin.aclose()
    await asyncio.sleep(0.5)  # sweeps run again before the slot frees
    await blocker.release()
    assert await queued == "ok"
