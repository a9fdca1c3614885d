"""Cross-instance guarantees proven with real separate processes."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

from dedup_fixtures import hold_slot
from dedupcall import Dedup
from procs import Proc, Spawner
from upstream import Upstream

FAST = {"lock_timeout": 1.0, "heartbeat_interval": 0.2, "retry_delay": 0.05, "poll_interval": 0.5}


def child(spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream, **spec: Any) -> Proc:
    spec = {
        "url": redis_url,
        "namespace": namespace,
        "upstream": upstream.url,
        **spec,
        "config": {**FAST, **spec.get("config", {})},
    }
    return spawn("caller.py", json.dumps(spec))


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_four_processes_fifty_callers_twenty_keys_run_each_key_once(
    spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream
) -> None:
    keys = [f"/k/{i}" for i in range(20)]
    procs = [
        child(spawn, redis_url, namespace, upstream, keys=keys, callers=50, delay=0.3)
        for _ in range(4)
    ]
    outs = [await asyncio.to_thread(p.json, 60) for p in procs]
    print([out["stats"] for out in outs])
    for out in outs:
        assert out["errors"] == []
        for key in keys:
            values = out["results"][key]
            assert len(values) == 50
            assert all(v == values[0] for v in values)
            assert values[0]["path"] == f"/value{key}"
    for key in keys:
        assert upstream.hits(f"/value{key}") == 1
        exec_ids = {out["results"][key][0]["exec_id"] for out in outs}
        assert len(exec_ids) == 1  # every process got the one execution's bytes
    assert upstream.hits() == 20
    assert sum(out["stats"]["executions"] for out in outs) == 20


async def test_max_concurrent_holds_across_three_processes(
    spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream
) -> None:
    procs = [
        child(
            spawn,
            redis_url,
            namespace,
            upstream,
            keys=[f"/c/{p}/{i}" for i in range(8)],
            delay=0.15,
            config={"max_concurrent": 3},
        )
        for p in range(3)
    ]
    outs = [await asyncio.to_thread(p.json, 60) for p in procs]
    assert all(out["errors"] == [] for out in outs)
    assert upstream.hits() == 24
    assert upstream.peak() == 3  # the limit was reached and never passed


async def test_sigkilled_executor_is_taken_over_and_every_waiter_answered(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    watcher = make_dedup()
    victim = child(spawn, redis_url, namespace, upstream, keys=["/kill"], callers=5, delay=60)
    await until(lambda: upstream.hits("/value/kill") == 1)  # the victim executes
    survivor = child(spawn, redis_url, namespace, upstream, keys=["/kill"], callers=25, delay=0.05)
    await until(lambda: _waiters(watcher, "/kill", 2))
    rid = (await watcher.get_flight_by_key("/kill")).request_id
    killed_at = time.monotonic()
    victim.kill(signal.SIGKILL)
    out = await asyncio.to_thread(survivor.json, 30)
    recovered_in = time.monotonic() - killed_at
    assert out["errors"] == []
    assert len(out["results"]["/kill"]) == 25
    assert {v["hit"] for v in out["results"]["/kill"]} == {2}
    assert upstream.hits("/value/kill") == 2
    assert recovered_in < 1.0 + 0.2 * 3 + 3.0  # lease + heartbeat expiry + generous margin
    result = await watcher.wait_for_result(rid, timeout=5)
    assert result.success and result.attempts == 2
    assert result.executed_by == out["instance_id"]


async def _waiters(dedup: Dedup, key: str, n: int) -> bool:
    item = await dedup.get_flight_by_key(key)
    return item is not None and item.waiters >= n


async def test_frozen_executor_completion_is_refused_and_it_gets_the_stored_result(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    watcher = make_dedup()
    frozen = child(spawn, redis_url, namespace, upstream, keys=["/fence"], callers=3, delay=0.5)
    await until(lambda: upstream.hits("/value/fence") == 1)
    frozen.kill(signal.SIGSTOP)  # a GC pause or a stalled VM, longer than the lease
    try:
        taker = child(spawn, redis_url, namespace, upstream, keys=["/fence"], callers=3, delay=0.05)
        out = await asyncio.to_thread(taker.json, 30)
    finally:
        frozen.kill(signal.SIGCONT)
    frozen_out = await asyncio.to_thread(frozen.json, 30)
    winner = out["results"]["/fence"][0]
    assert winner["hit"] == 2
    # the woken executor's own callers receive the flight's stored result, not their own
    assert frozen_out["results"]["/fence"] == [winner] * 3
    assert frozen_out["stats"]["lease_lost"] == 1
    assert upstream.hits("/value/fence") == 2
    assert await watcher.get_flight_by_key("/fence") is None


async def test_update_config_reaches_another_process_within_a_second(
    spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream, dedup: Dedup
) -> None:
    proc = child(
        spawn,
        redis_url,
        namespace,
        upstream,
        mode="config",
        expect={"max_concurrent": 7, "retry_delay": 0.25},
        within=5,
    )
    await asyncio.to_thread(proc.wait_line, "watching", 30)
    await dedup.update_config(max_concurrent=7, retry_delay=0.25)
    out = await asyncio.to_thread(proc.json, 30)
    assert out["seen_after"] is not None and out["seen_after"] < 1.0


async def test_queued_request_survives_the_death_of_its_submitter(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(max_concurrent=1)
    blocker = await hold_slot(dedup)
    submitter = child(
        spawn,
        redis_url,
        namespace,
        upstream,
        mode="submit",
        api_path="/orphan",
        target=f"{upstream.url}/value/orphan",
    )
    line = await asyncio.to_thread(submitter.wait_line, "request_id", 30)
    rid = json.loads(line)["request_id"]
    submitter.kill(signal.SIGKILL)
    await asyncio.to_thread(submitter.wait, 10)
    worker = child(spawn, redis_url, namespace, upstream, mode="worker")
    await asyncio.to_thread(worker.wait_line, "working", 30)
    await blocker.release()
    result = await dedup.wait_for_result(rid, timeout=10)
    assert result.success and result.data["path"] == "/value/orphan"
    assert upstream.hits("/value/orphan") == 1
    worker.kill(signal.SIGTERM)
    code, _, _ = await asyncio.to_thread(worker.wait, 15)
    assert code == 0  # graceful stop on SIGTERM


async def test_flight_whose_every_holder_died_is_failed_and_cleaned(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(max_concurrent=1)
    blocker = await hold_slot(dedup)
    holder = child(spawn, redis_url, namespace, upstream, keys=["/orphan-fn"], callers=3)
    await until(lambda: dedup.get_flight_by_key("/orphan-fn"))
    item = await dedup.get_flight_by_key("/orphan-fn")
    assert item is not None and item.state == "queued"
    holder.kill(signal.SIGKILL)
    result = await dedup.wait_for_result(item.request_id, timeout=10)
    assert (result.success, result.error_type) == (False, "NoHolder")
    assert (await dedup.get_queue_status()).queue_length == 0
    assert await blocker.release() == 1
    assert upstream.hits() == 0


async def test_poison_call_that_kills_every_executor_fails_after_max_retries(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    watcher = make_dedup(max_retries=1)  # seeds the namespace's shared config
    await watcher.start()
    victims = [
        child(spawn, redis_url, namespace, upstream, keys=["/poison"], crash=True) for _ in range(3)
    ]
    rid = None
    while rid is None:
        item = await watcher.get_flight_by_key("/poison")
        rid = item.request_id if item else None
        await asyncio.sleep(0.01)
    result = await watcher.wait_for_result(rid, timeout=15)
    assert (result.success, result.error_type) == (False, "LeaseExpired")
    assert result.attempts == 2  # 1 + max_retries runs, then no further requeue
    ends = [await asyncio.to_thread(v.wait, 15) for v in victims]
    assert sorted(code for code, _, _ in ends) == [0, 1, 1]  # two ran it and died
    survivor = next(out for code, out, _ in ends if code == 0)
    assert "LeaseExpired" in survivor  # the third was told, and lived
    status = await watcher.get_queue_status()
    assert (status.queue_length, status.running, status.delayed) == (0, 0, 0)
