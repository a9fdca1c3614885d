"""Round trips per call, counted by a real MONITOR on a private server.

DESIGN.md: cache hit 1; uncontended cold call 2 (submit-and-grant, complete); joining
waiter 1 plus the push when the result is small enough to ride in it, else 2 (submit,
then one GET after the push).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dedupcall import Dedup, codec
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

        async def join(key: str, value: object) -> list[str]:
            """Commands the joiner ``b`` sends while ``a`` runs ``key`` and returns ``value``."""

            async def held() -> object:
                await gate.wait()
                return value

            gate.clear()
            executing = asyncio.create_task(a.call(key, held))
            while a.worker.executing == 0:
                await asyncio.sleep(0.005)
            mon.mark(f"{key}-start")
            joiner = asyncio.create_task(b.call(key, held))
            rid = a._local[("function", codec.key_digest("function", key))].request_id
            assert rid is not None
            while mon.query("SCARD", a.keys.holders(rid)) != b":2\r\n":  # b has joined
                await asyncio.sleep(0.005)
            gate.set()
            assert (await executing, await joiner) == (value, value)
            mon.mark(f"{key}-end")
            commands = mon.between(f"{key}-start", f"{key}-end")
            return [c.name for c in commands if c.name != "script:complete"]  # a's

        gate = asyncio.Event()
        small = await join("/rt/join-small", 2)
        big = await join("/rt/join-big", "x" * 2000)
        cold = [c.name for c in mon.between("cold-start", "cold-end")]
        hit = [c.name for c in mon.between("cold-end", "hit-end")]

    assert cold == ["script:submit", "script:complete"]
    assert hit == ["script:submit"]
    assert small == ["script:submit"]  # the result rode in the push
    assert big == ["script:submit", "GET"]  # too big to ride: one GET after the push
    print(
        f"\nround trips: cold={len(cold)} hit={len(hit)} join={len(small)} (+push), "
        f"join with a big result={len(big)}"
    )


async def test_round_trips_of_the_entry_points(
    make_redis_server: Callable[..., object], make_dedup: Callable[..., Dedup], upstream: object
) -> None:
    """Each entry point costs what ``dedup.call`` costs: cold 2 (submit, complete), hit 1;
    a request the transport does not deduplicate costs none."""
    import httpx

    from dedupcall import AsyncDedupTransport, DedupTransport, queued_api

    server = make_redis_server()
    dedup = make_dedup(url=server.url, **QUIET)  # type: ignore[attr-defined]
    await dedup.start()
    await asyncio.sleep(0.1)
    base = upstream.url  # type: ignore[attr-defined]

    @queued_api(path="/rt/async/{n}", dedup=dedup)
    async def async_fn(n: int) -> int:
        return n

    @queued_api(path="/rt/sync/{n}", dedup=dedup)
    def sync_fn(n: int) -> int:
        return n

    counts: dict[str, list[str]] = {}
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        sync_client = httpx.Client(transport=DedupTransport(dedup))
        steps = {
            "decorator": lambda: async_fn(1),
            "sync decorator": lambda: asyncio.to_thread(sync_fn, 1),
            "async transport": lambda: client.get(f"{base}/value/rt-a"),
            "sync transport": lambda: asyncio.to_thread(sync_client.get, f"{base}/value/rt-s"),
        }
        with Monitor(server.port) as mon:  # type: ignore[attr-defined]
            for name, step in steps.items():
                for phase in ("cold", "hit"):
                    label = f"{name}-{phase}".replace(" ", "-")  # a marker is one word
                    mon.mark(label)
                    await step()
                    mon.mark(f"{label}-end")
                    commands = mon.between(label, f"{label}-end")
                    counts[f"{name} {phase}"] = [c.name for c in commands]
            mon.mark("post")
            await client.post(f"{base}/echo", content=b"x")
            mon.mark("post-end")
            counts["transport pass-through"] = [c.name for c in mon.between("post", "post-end")]
        sync_client.close()
    for name in steps:
        assert counts[f"{name} cold"] == ["script:submit", "script:complete"], counts
        assert counts[f"{name} hit"] == ["script:submit"], counts
    assert counts["transport pass-through"] == []
    print("\nround trips:", {name: len(c) for name, c in counts.items()})
