"""Hostile records: every field of every record the scripts read, corrupted by hand one at
a time (missing, empty, not a number, huge, a key of the wrong type). The flight it
belongs to ends (a result or a typed failure), every other flight proceeds, and every
view of the namespace renders."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from dedup_fixtures import hold_slot
from dedupcall import Dedup, DedupError, Result
from dedupcall.codec import key_digest
from dedupcall.config import SHARED_FIELDS
from dedupcall.console import status_group
from dedupcall.keys import KeySpace
from dedupcall.prometheus import render
from dedupcall.report import item_view, status_view
from upstream import Upstream

FLIGHT_FIELDS = [
    "kind",
    "key",
    "digest",
    "prio",
    "seq",
    "att",
    "ttl",
    "cf",
    "fp",
    "cred",
    "payload",
    "created",
    "deadline",
    "state",
    "token",
    "exec",
    "started",
]
VALUES: dict[str, str | None] = {"missing": None, "empty": "", "text": "abc", "huge": "9" * 400}
QUICK = {"lock_timeout": 0.5, "heartbeat_interval": 0.1, "poll_interval": 0.2}


async def corrupt(raw: aioredis.Redis, key: str, field: str, value: str | None) -> None:
    if value is None:
        await raw.hdel(key, field)
    else:
        await raw.hset(key, field, value)


async def wrong_type(raw: aioredis.Redis, key: str) -> None:
    pipe = raw.pipeline(transaction=True)  # atomic: a sweep may write the key meanwhile
    pipe.delete(key)
    pipe.rpush(key, "not", "a", "hash")
    await pipe.execute()


async def renders(dedup: Dedup) -> None:
    """Every view an operator has: status, items, their JSON, the CLI's tables, metrics."""
    from rich.console import Console

    status = await dedup.get_queue_status()
    view = status_view(status, dedup.namespace)
    json.dumps(view)
    json.dumps([item_view(i) for i in await dedup.get_queue_items()])
    Console(file=io.StringIO()).print(status_group(view, "redis://x"))
    render(status)


async def answered(dedup: Dedup, rid: str) -> Result | DedupError:
    """The victim's waiter gets a result or a typed error, never a hang."""
    try:
        return await dedup.wait_for_result(rid, timeout=5)
    except DedupError as exc:
        assert type(exc).__name__ != "WaitTimeout", exc
        return exc


async def bystanders(dedup: Dedup, upstream: Upstream) -> Callable[[], Awaitable[None]]:
    """Queued flights of both kinds that must complete whatever happens to the victim."""
    rid = await dedup.add_get_request("/by/request", f"{upstream.url}/by/request")

    async def value() -> str:
        return "by"

    call = asyncio.create_task(dedup.call("/by/function", value, timeout=5))

    async def check() -> None:
        assert (await dedup.wait_for_result(rid, timeout=5)).success
        assert await call == "by"

    return check


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("field", FLIGHT_FIELDS)
async def test_a_corrupt_queued_flight_fails_alone(
    field: str, value: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1, **QUICK)
    blocker = await hold_slot(dedup)
    victim = await dedup.add_get_request("/victim", f"{upstream.url}/victim", priority=1)
    check = await bystanders(dedup, upstream)
    await corrupt(dedup.store.redis, dedup.keys.flight(victim), field, VALUES[value])
    await renders(dedup)
    await blocker.release()
    await answered(dedup, victim)
    await check()
    await renders(dedup)


@pytest.mark.parametrize("state", ["queued", "running", "delayed"])
async def test_a_flight_record_of_the_wrong_type_fails_alone(
    state: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=2, retry_delay=1.0, **QUICK)
    blocker = None
    if state == "queued":
        blocker = await hold_slot(dedup)
        await hold_slot(dedup, "/blocker2")
    path = {"running": "/victim?delay=0.5", "delayed": "/victim?status=503"}.get(state, "/victim")
    victim = await dedup.add_get_request("/victim", f"{upstream.url}{path}")
    for _ in range(200):
        item = await dedup.get_flight(victim)
        if item is not None and item.state == state:
            break
        await asyncio.sleep(0.01)
    await wrong_type(dedup.store.redis, dedup.keys.flight(victim))
    await renders(dedup)
    if blocker is not None:
        await blocker.release()
    check = await bystanders(dedup, upstream)
    await answered(dedup, victim)
    await check()
    await renders(dedup)


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("field", ["att", "state", "token", "exec", "started", "ttl", "cf"])
async def test_a_corrupt_running_flight_ends_and_others_proceed(
    field: str, value: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=2, **QUICK)
    victim = await dedup.add_get_request("/victim", f"{upstream.url}/victim?delay=0.3")
    while (item := await dedup.get_flight(victim)) is None or item.state != "running":
        await asyncio.sleep(0.01)
    await corrupt(dedup.store.redis, dedup.keys.flight(victim), field, VALUES[value])
    check = await bystanders(dedup, upstream)
    await renders(dedup)
    await answered(dedup, victim)
    await check()


@pytest.mark.parametrize(
    "record", ["holders", "held", "active", "cache", "result", "seq", "epoch", "config"]
)
async def test_side_records_of_the_wrong_type_harm_nothing(
    record: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(**QUICK)
    await dedup.start()
    k = dedup.keys
    runs = 0

    async def value() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await dedup.call("/side", value) == 1
    rid = (await dedup.add_get_request("/side-req", f"{upstream.url}/side")) or ""
    await dedup.wait_for_result(rid, timeout=5)
    digest = key_digest("function", "/side")
    target = {
        "holders": k.holders(rid),
        "held": k.held(dedup.instance_id),
        "active": k.active(digest),
        "cache": k.cache(digest),
        "result": k.result(rid),
        "seq": k.seq,
        "epoch": k.prefix + "epoch",
        "config": k.config,
    }[record]
    await wrong_type(dedup.store.redis, target)
    await renders(dedup)
    assert await dedup.call("/side/other", value) >= 1
    assert await dedup.call("/side", value) >= 1
    await answered(dedup, rid)
    check = await bystanders(dedup, upstream)
    await check()


@pytest.mark.parametrize("value", ["not json", '{"ok": "yes"}', "[1, 2]", '"text"', "{"])
async def test_a_corrupt_stored_result_is_a_typed_failure_and_is_evicted(
    value: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(**QUICK)
    runs = 0

    async def fresh() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await dedup.call("/stored", fresh) == 1
    rid = await dedup.add_get_request("/stored-req", f"{upstream.url}/stored")
    await dedup.wait_for_result(rid, timeout=5)
    cached = await dedup.store.redis.get(dedup.keys.cache(key_digest("function", "/stored")))
    await dedup.store.redis.set(dedup.keys.result(cached.split()[0].decode()), value)
    await dedup.store.redis.set(dedup.keys.result(rid), value)
    # the unreadable cached answer is evicted, not served: the call runs again
    assert await dedup.call("/stored", fresh) == 2
    # (another instance: this one remembers the pushed result it saw)
    failed = await make_dedup(**QUICK).wait_for_result(rid, timeout=5)
    assert not failed.success and failed.error_type == "MalformedResult"
    again = await dedup.add_get_request("/stored-req", f"{upstream.url}/stored")
    assert again != rid and (await dedup.wait_for_result(again, timeout=5)).success


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("field", SHARED_FIELDS)
async def test_corrupt_shared_config_is_restored_before_anything_runs(
    field: str, value: str, make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup(**QUICK)
    await dedup.start()
    config = KeySpace(namespace).config
    before = await dedup.store.redis.hget(config, field)
    await corrupt(dedup.store.redis, config, field, VALUES[value])
    await renders(dedup)

    async def one() -> int:
        return 1

    assert await dedup.call("/after-config", one) == 1
    assert await dedup.store.redis.hget(config, field) == before


@pytest.mark.parametrize(
    "info",
    [
        "not json",
        "[]",
        '{"hb_ms": "x", "pid": "x", "host": 5, "stats": "x"}',
        '{"hb_ms": 1e300, "pid": -1, "window_ms": [], "stats": {"executed": "x"}}',
        '{"stats": {"wait_seconds": {"joined": {"counts": "x", "sum": "y"}}}}',
        '{"stats": {"wait_seconds": {"joined": {"counts": [1e9, -5], "sum": 1, "count": 2}}}}',
        '{"stats": {"execution_seconds": {"counts": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, '
        '13, 14, 15, 16, 17, 18, 19, 20], "sum": 1, "count": 3}}}',
        None,
    ],
)
async def test_a_corrupt_instance_record_never_breaks_a_view(
    info: str | None, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(**QUICK)
    await dedup.start()
    k = dedup.keys
    # A stranger in the registry (alive, with this record), and our own record spoiled.
    raw: Any = dedup.store.redis
    now = await raw.time()
    await raw.zadd(k.instances, {"stranger": (now[0] + 60) * 1000, "x" * 5000: 1})
    await raw.sadd(k.held("x" * 5000), "no-such-flight")
    for name in ("stranger", dedup.instance_id):
        if info is None:
            await wrong_type(raw, k.instance_info(name))
        else:
            await raw.set(k.instance_info(name), info)
    await renders(dedup)
    check = await bystanders(dedup, upstream)
    await check()


async def test_queue_members_without_a_flight_are_dropped(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1, **QUICK)
    await dedup.start()
    k, raw = dedup.keys, dedup.store.redis
    ghosts = {"ghost": 0, "x" * 5000: -1e15, "spa ce": 1}
    for name in (k.queue, k.delayed, k.running):
        await raw.zadd(name, ghosts)
    await renders(dedup)
    check = await bystanders(dedup, upstream)
    await check()
    for _ in range(100):  # the sweep drops them
        if not await raw.zcard(k.running) and not await raw.zcard(k.delayed):
            break
        await asyncio.sleep(0.05)
    assert await raw.zcard(k.queue) == 0
    assert await raw.zcard(k.running) == 0 and await raw.zcard(k.delayed) == 0
