"""Attacks: Redis loses part of its data while flights run, its shared config intact (a
failover to a replica that missed the last writes, an operator deleting a flight by
hand), and queued requests meet a restart. Nothing may run twice while its first run is
alive, the limit must hold, and every waiter must get the flight's answer."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable

import httpx
import pytest
import redis.asyncio as aioredis

from dedup_fixtures import lose_data
from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer
from procs import Spawner
from upstream import Upstream

# Renewals every second: a loss is noticed by the executor at its next renewal.
CONFIG = {"lock_timeout": 3.0, "heartbeat_interval": 0.2, "poll_interval": 0.3}


async def forget_flight(raw: aioredis.Redis, dedup: Dedup, key: str) -> None:
    """Lose the running flight of ``key``'s record by hand; the rest (its key, holders and
    lease) and the config stay."""
    item = await dedup.get_flight_by_key(key)
    assert item is not None and item.state == "running" and item.executor
    await raw.delete(dedup.keys.flight(item.request_id))


@pytest.mark.parametrize("how", ["record", "failover"])
@pytest.mark.parametrize("victim", ["same key", "other key"])
async def test_a_flight_lost_with_the_config_intact_never_runs_twice_nor_lifts_the_limit(
    how: str,
    victim: str,
    spawn: Spawner,
    make_redis_server: Callable[..., EmbeddedServer],
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    # Once-only is shown without a limit in the way, the limit with a limit of one.
    server = make_redis_server()
    config = {**CONFIG, "max_concurrent": 100 if victim == "same key" else 1}
    here = make_dedup(url=server.url, **config)
    await here.start()
    raw = aioredis.Redis.from_url(server.url)
    if how == "failover":
        await raw.save()  # what a replica has: everything but the flight about to start
    spec = {
        "url": server.url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": config,
        "keys": ["/alive"],
        "delay": 2.0,
        "timeout": 30,
    }
    child = spawn("caller.py", json.dumps(spec))  # runs /alive for 2 s
    while upstream.hits("/value/alive") == 0:
        await asyncio.sleep(0.01)
    if how == "failover":
        # The master dies; the replica that missed the flight's writes takes over on the
        # same address after a while (as Sentinel would hand it out).
        server.kill()
        await asyncio.sleep(0.8)
        server.restart()  # loads the snapshot: config and instances, no flight
    else:
        await forget_flight(raw, here, "/alive")
    await raw.aclose()

    ran_here = 0

    async def call() -> str:
        nonlocal ran_here
        ran_here += 1
        async with httpx.AsyncClient() as client:
            await client.get(f"{upstream.url}/value/here")
        return "ran here"

    # The same key must join the run in progress; another key must wait for the only slot.
    key = "/alive" if victim == "same key" else "/other"
    await here.call(key, call, timeout=30)
    child.json(timeout=30)
    assert upstream.hits("/value/alive") == 1
    if victim == "same key":
        assert ran_here == 0
    else:
        assert upstream.peak() == 1  # never two upstream calls at once under max_concurrent=1


async def test_grants_stay_paused_until_a_slow_executor_re_established_its_flight(
    spawn: Spawner,
    redis_server: EmbeddedServer,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    # The executor of a flight Redis forgot is slow to notice (frozen here, as under heavy
    # load) for longer than one renewal interval, but less than a lease: it is alive, so
    # the key must wait for it, not run a second time once some fixed pause has passed.
    here = make_dedup(**CONFIG)
    await here.start()
    spec = {
        "url": redis_server.url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": CONFIG,
        "keys": ["/slow"],
        "delay": 4.0,
        "timeout": 30,
    }
    child = spawn("caller.py", json.dumps(spec))
    while upstream.hits("/value/slow") == 0:
        await asyncio.sleep(0.01)
    raw = aioredis.Redis.from_url(redis_server.url)
    child.kill(signal.SIGSTOP)
    try:
        await forget_flight(raw, here, "/slow")
        ran_here = 0

        async def call() -> str:
            nonlocal ran_here
            ran_here += 1
            return "ran here"

        joined = asyncio.ensure_future(here.call("/slow", call, timeout=30))
        await asyncio.sleep(1.8)  # past one renewal interval (1 s) and its margin
        assert not joined.done() and ran_here == 0
    finally:
        child.kill(signal.SIGCONT)
        await raw.aclose()
    await joined
    child.json(timeout=30)
    assert upstream.hits("/value/slow") == 1 and ran_here == 0


@pytest.mark.parametrize("how", ["restart", "flushdb"])
async def test_a_queued_request_submitted_right_after_a_loss_gets_the_answer(
    how: str,
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    upstream: Upstream,
) -> None:
    server = make_redis_server()
    faulty = {"socket_timeout": 1.0, "lock_timeout": 1.5, "poll_interval": 0.3}
    runner, other = make_dedup(url=server.url, **faulty), make_dedup(url=server.url, **faulty)
    await runner.start()
    await other.start()
    url = f"{upstream.url}/report?delay=2.0"
    first = await runner.add_get_request("/report", url)
    while upstream.hits("/report") == 0:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(other.wait_for_result(first, timeout=15))
    while first not in other._notifier._watchers and not waiting.done():  # looked once
        await asyncio.sleep(0.01)
    await lose_data(server, how)
    # Submitted again while the executor re-establishes its run: it joins that run (or
    # runs once more after it), and its caller gets an answer either way.
    again = await other.add_get_request("/report", url)
    answers = await asyncio.gather(
        waiting, other.wait_for_result(again, timeout=15), return_exceptions=True
    )
    assert [getattr(a, "success", a) for a in answers] == [True, True]
    assert upstream.hits("/report") == 1


async def test_a_waiter_arriving_right_after_a_loss_is_not_told_its_request_is_unknown(
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    upstream: Upstream,
) -> None:
    server = make_redis_server()
    config = {"socket_timeout": 1.0, "lock_timeout": 3.0, "heartbeat_interval": 1.0}
    runner, other = make_dedup(url=server.url, **config), make_dedup(url=server.url, **config)
    await runner.start()
    await other.start()
    rid = await runner.add_get_request("/slow", f"{upstream.url}/slow?delay=1.5")
    while upstream.hits("/slow") == 0:
        await asyncio.sleep(0.01)
    await lose_data(server, "flushdb")
    # The request still runs and is re-established at its executor's next renewal: a
    # client polling for it right now must get its answer, not "never queued".
    result = await other.wait_for_result(rid, timeout=15)
    assert result.success and upstream.hits("/slow") == 1
