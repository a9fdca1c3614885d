"""Round trips per call, counted by a real MONITOR on a private server.

DESIGN.md: cache hit 1; uncontended cold call 2 (submit-and-grant, complete); joining
waiter 2 (submit, read the result after the push).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dedupcall import Dedup
from monitor import Monitor

QUIET = {"heartbeat_interval": 30.0, "lock_timeout": 30.0}  # no sweep or renewal mid-count


async def test_round_trips_cold_hit_join(
    make_redis_server: Callable[..., object], make_dedup: Callable[..., Dedup]
) -> None:
    server = make_redis_server()
    a = make_dedup(url=server.url, **QUIET)  # type: ignore[attr-defined]
    b = make_dedup(url=server.url, **QUIET)  # type: ignore[attr-defined]
    await a.start()
    await b.start()
    await asyncio.sleep(0.1)  # first sweeps done

    async def value() -> int:
        return 1

    with Monitor(server.port) as mon:  # type: ignore[attr-defined]
        mon.mark("cold-start")
        await a.call("/rt/cold", value)
        mon.mark("cold-end")
        await a.call("/rt/cold", value)
        mon.mark("hit-end")

        gate = asyncio.Event()

        async def held() -> int:
            await gate.wait()
            return 2

        executing = asyncio.create_task(a.call("/rt/join", held))
        while a.worker.executing == 0:
            await asyncio.sleep(0.005)
        mon.mark("join-start")
        joiner = asyncio.create_task(b.call("/rt/join", held))
        while not b._by_id:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # b's submit has returned; it now waits for the push
        gate.set()
        assert (await executing, await joiner) == (2, 2)
        mon.mark("join-end")

        cold = [c.name for c in mon.between("cold-start", "cold-end")]
        hit = [c.name for c in mon.between("cold-end", "hit-end")]
        join = mon.between("join-start", "join-end")

    assert cold == ["script:submit", "script:complete"]
    assert hit == ["script:submit"]
    joiner_commands = [c.name for c in join if c.name != "script:complete"]
    assert joiner_commands == ["script:submit", "GET"]
    print(f"\nround trips: cold={len(cold)} hit={len(hit)} join={len(joiner_commands)}")
