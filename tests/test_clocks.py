"""Clock faults (libfaketime): the server's clock jumps forward while flights run, and a
process runs with its clock skewed. Leases and heartbeats follow Redis' clock and
relative timers only, so neither loses an answer nor makes anyone take over early."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from clocks import faketime_engine, skewed
from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer
from procs import Spawner
from upstream import Upstream

QUICK = {"lock_timeout": 1.0, "heartbeat_interval": 0.2, "poll_interval": 0.3}


def spec(url: str, namespace: str, upstream: Upstream, key: str, delay: float) -> str:
    return json.dumps(
        {
            "url": url,
            "namespace": namespace,
            "upstream": upstream.url,
            "config": QUICK,
            "keys": [key],
            "delay": delay,
            "timeout": 30,
        }
    )


async def test_a_server_clock_jump_breaks_no_answer(
    tmp_path: Path,
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    spawn: Spawner,
    namespace: str,
    upstream: Upstream,
) -> None:
    found = faketime_engine(tmp_path)
    if found is None:
        pytest.skip("needs libfaketime (apt-get install faketime) and the embedded extra")
    engine, clock = found
    server = make_redis_server(engine=engine)
    child = spawn("caller.py", spec(server.url, namespace, upstream, "/jump", 1.5))
    here = make_dedup(url=server.url, **QUICK)

    async def fetch() -> object:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{upstream.url}/value/jump")).json()

    while upstream.hits("/value/jump") == 0:
        await asyncio.sleep(0.01)
    joined = asyncio.create_task(here.call("/jump", fetch, timeout=30))
    await asyncio.sleep(0.2)
    clock.write_text("+3s\n")  # past every lease and heartbeat, at once
    value = await joined
    out = child.json(timeout=30)
    assert out["errors"] == [] and out["results"]["/jump"] == [value]  # one answer
    assert upstream.hits("/value/jump") <= 2  # at most the one run a jump may cost


@pytest.mark.parametrize("offset", ["+30s", "-30s"])
async def test_a_skewed_process_neither_takes_over_early_nor_fails(
    offset: str,
    redis_url: str,
    spawn: Spawner,
    namespace: str,
    upstream: Upstream,
) -> None:
    env = skewed(offset)
    if not env:
        pytest.skip("needs libfaketime (apt-get install faketime)")
    executor = spawn("caller.py", spec(redis_url, namespace, upstream, "/skew", 30.0))
    while upstream.hits("/value/skew") == 0:
        await asyncio.sleep(0.01)
    waiter = spawn("caller.py", spec(redis_url, namespace, upstream, "/skew", 0.1), env=env)
    waiter.wait_line("calling")
    await asyncio.sleep(0.3)  # it joined as a holder
    executor.kill(signal.SIGKILL)
    killed = time.monotonic()
    while upstream.hits("/value/skew") < 2:
        await asyncio.sleep(0.01)
    taken_over = time.monotonic() - killed
    out = waiter.json(timeout=30)
    assert out["errors"] == [] and len(out["results"]["/skew"]) == 1
    assert taken_over > QUICK["lock_timeout"] * 2 / 3  # not before the lease ran out
