"""Callers cancelled at random moments harm nobody and leave nothing behind."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from dedupcall import Dedup


async def test_cancel_storm_leaves_correct_answers_and_no_state(
    make_dedup: Callable[..., Dedup],
) -> None:
    a, b = make_dedup(max_concurrent=20), make_dedup(max_concurrent=20)
    rng = random.Random(7)

    def fn(key: str) -> Callable[[], object]:
        async def run() -> str:
            await asyncio.sleep(rng.uniform(0, 0.02))
            return key

        return run

    keys = [f"/storm/{i}" for i in range(200)]
    calls = [(rng.choice((a, b)), rng.choice(keys)) for _ in range(1000)]
    tasks = [asyncio.create_task(d.call(k, fn(k), timeout=20)) for d, k in calls]
    cancelled = set(rng.sample(range(len(tasks)), 500))
    for i in sorted(cancelled, key=lambda _: rng.random()):
        await asyncio.sleep(rng.uniform(0, 0.002))
        tasks[i].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, ((_, key), result) in enumerate(zip(calls, results, strict=True)):
        if isinstance(result, asyncio.CancelledError):
            assert i in cancelled
        else:
            assert result == key  # never another key's answer (S1)

    for dedup in (a, b):
        while dedup._local:  # drivers of abandoned flights finish their leave
            await asyncio.sleep(0.01)
    status = await a.get_queue_status()
    assert (status.queue_length, status.running, status.delayed) == (0, 0, 0)
    leftovers = [
        name
        async for name in a.store.redis.scan_iter(match=a.keys.prefix + "*", count=1000)
        if name.decode().split(":", 2)[1] in ("f", "h", "k")
    ]
    assert leftovers == []  # no flight, holder set or active index left behind
    assert await a.store.redis.scard(a.keys.held(a.instance_id)) == 0
