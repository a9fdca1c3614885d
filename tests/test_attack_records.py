"""Attacks: hand-written records the scripts accept as valid but Redis then refuses, side
records of the wrong type on the join path, and a recovery pause written far ahead. One
bad record may fail its own flight, never the namespace or its neighbours."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from dedup_fixtures import hold_slot
from dedupcall import Dedup
from test_hostile_records import QUICK, answered, bystanders, corrupt, renders
from upstream import Upstream


# Numbers to Lua's tonumber(), not integers to HINCRBY: "hash value is not an integer".
@pytest.mark.parametrize("value", ["1.0", "0x1", " 1"])
async def test_an_attempt_count_lua_reads_but_redis_cannot_increment_fails_alone(
    value: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1, **QUICK)
    blocker = await hold_slot(dedup)
    victim = await dedup.add_get_request("/victim", f"{upstream.url}/victim", priority=1)
    check = await bystanders(dedup, upstream)
    await corrupt(dedup.store.redis, dedup.keys.flight(victim), "att", value)
    await blocker.release()  # the victim is next in line: its grant meets the bad count
    await answered(dedup, victim)
    await check()
    await renders(dedup)


@pytest.mark.parametrize("record", ["holders of the flight", "held by the joiner"])
async def test_joining_a_flight_survives_a_side_record_of_the_wrong_type(
    record: str, make_dedup: Callable[..., Dedup]
) -> None:
    runner, joiner = make_dedup(**QUICK), make_dedup(**QUICK)
    await runner.start()
    await joiner.start()
    gate = asyncio.Event()
    runs = 0

    async def value() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return runs

    first = asyncio.create_task(runner.call("/joined", value, timeout=10))
    while runs == 0:
        await asyncio.sleep(0.01)
    item = await runner.get_flight_by_key("/joined")
    assert item is not None
    k = runner.keys
    target = (
        k.holders(item.request_id) if record.startswith("holders") else k.held(joiner.instance_id)
    )
    pipe = runner.store.redis.pipeline(transaction=True)
    pipe.delete(target)
    pipe.set(target, "not a set")
    await pipe.execute()
    # The joiner's call must join the run in progress (or at worst run its own), never
    # fail with RedisUnavailable, which also sends bypassing entry points to the upstream.
    joined = asyncio.create_task(joiner.call("/joined", value, timeout=10))
    for _ in range(300):  # until it joined (or failed); a repaired join may count apart
        if joined.done() or (await joiner.get_flight_by_key("/joined") or item).waiters >= 2:
            break
        await asyncio.sleep(0.01)
    gate.set()
    assert await first == 1
    assert await joined >= 1


@pytest.mark.parametrize("ahead", ["one hour", "inf"])
async def test_a_recovery_pause_written_far_ahead_never_stops_the_namespace(
    ahead: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    # The pause after a data loss is stamped with the server's clock; a failover to a
    # server whose clock is an hour behind (or a hand-written value) must not stop every
    # grant for that long.
    dedup = make_dedup(**QUICK)
    await dedup.start()
    raw = dedup.store.redis
    seconds, _ = await raw.time()
    value = str((seconds + 3600) * 1000) if ahead == "one hour" else "inf"
    await raw.hset(dedup.keys.config, "recover_until", value)

    async def one() -> int:
        return 1

    assert await dedup.call("/after-pause", one, timeout=5) == 1
    rid = await dedup.add_get_request("/after-pause", f"{upstream.url}/after-pause")
    assert (await dedup.wait_for_result(rid, timeout=5)).success
