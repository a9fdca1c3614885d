"""Leases and liveness under change and stalls: a lease shortened at runtime is renewed at
its new pace, and a process whose loop stalls for less than a lease keeps its flights."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable

from dedup_fixtures import hold_slot
from dedupcall import Dedup
from procs import Spawner
from upstream import Upstream


async def running(dedup: Dedup, key: str) -> None:
    for _ in range(1000):
        item = await dedup.get_flight_by_key(key)
        if item is not None and item.state == "running":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} never ran")


async def test_a_lease_shortened_at_runtime_is_renewed_at_its_new_pace(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    config = {"lock_timeout": 30.0, "heartbeat_interval": 0.2}
    here = make_dedup(**config)
    await here.start()
    spec = {
        "url": redis_url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": config,
        "keys": ["/long"],
        "delay": 3.0,
    }
    child = spawn("caller.py", json.dumps(spec))
    await running(here, "/long")
    await here.update_config(lock_timeout=1.0)  # every lease is now 1 s long
    ran_here = 0

    async def same() -> str:
        nonlocal ran_here
        ran_here += 1
        return "ran twice"

    value = await here.call("/long", same, timeout=20)
    out = child.json(timeout=30)
    assert ran_here == 0 and upstream.hits("/value/long") == 1
    assert out["results"]["/long"] == [value] and out["stats"]["lease_lost"] == 0


async def test_a_short_stall_of_a_live_holder_does_not_fail_its_flight(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    # A heartbeat keeps an instance alive for 1 s; a lease lasts 4 s.
    config = {"lock_timeout": 4.0, "heartbeat_interval": 0.2, "max_concurrent": 1}
    here = make_dedup(**config)
    blocker = await hold_slot(here)  # the child's flight waits in the queue
    spec = {
        "url": redis_url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": config,
        "keys": ["/stalled"],
        "timeout": 30,
    }
    child = spawn("caller.py", json.dumps(spec))
    child.wait_line("calling")
    for _ in range(500):
        item = await here.get_flight_by_key("/stalled")
        if item is not None and item.waiters == 1:
            break
        await asyncio.sleep(0.01)
    child.kill(signal.SIGSTOP)  # its loop stalls past its heartbeat, within a lease
    stalled = time.monotonic()
    while time.monotonic() - stalled < 2.0:
        await asyncio.sleep(0.1)  # our sweeps run meanwhile
    child.kill(signal.SIGCONT)
    await blocker.release()
    out = child.json(timeout=30)
    assert out["errors"] == [] and len(out["results"]["/stalled"]) == 1
    assert upstream.hits("/value/stalled") == 1
