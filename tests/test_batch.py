"""Automatic pipelining: concurrent commands share pipelines, answers never cross."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import redis.asyncio as aioredis

from dedupcall import Dedup
from dedupcall.batch import Batcher


async def test_concurrent_commands_batch_and_each_gets_its_own_reply(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client)
    sent = 0
    real_pipeline = client.pipeline

    def counting_pipeline(*args: object, **kwargs: object) -> aioredis.client.Pipeline:
        nonlocal sent
        sent += 1
        return real_pipeline(*args, **kwargs)  # type: ignore[arg-type]

    client.pipeline = counting_pipeline  # type: ignore[method-assign]
    keys = [f"batch:{i}" for i in range(1000)]
    await asyncio.gather(*(batcher.execute("SET", k, k.upper()) for k in keys))
    replies = await asyncio.gather(*(batcher.execute("GET", k) for k in keys))
    assert replies == [k.upper().encode() for k in keys]
    assert sent < 100  # 2000 commands went out in a few pipelines
    await client.delete(*keys)
    await client.aclose()


async def test_cancelled_callers_leave_the_others_their_answers(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client)
    rng = random.Random(3)
    tasks = [asyncio.ensure_future(batcher.execute("ECHO", f"v{i}")) for i in range(2000)]
    await asyncio.sleep(0)
    for task in rng.sample(tasks, 700):
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        assert isinstance(result, asyncio.CancelledError) or result == f"v{i}".encode()
    # the connections are clean: the next replies are the right ones
    assert await batcher.execute("ECHO", "after") == b"after"
    assert await asyncio.gather(*(batcher.execute("ECHO", str(i)) for i in range(50))) == [
        str(i).encode() for i in range(50)
    ]
    await client.aclose()


async def test_scripts_reload_after_a_flush_mid_burst(make_dedup: Callable[..., Dedup]) -> None:
    dedup = make_dedup()
    await dedup.start()
    await dedup.store.redis.script_flush()

    async def value() -> int:
        return 9

    keys = [f"/flushed/{i}" for i in range(200)]
    assert await asyncio.gather(*(dedup.call(k, value) for k in keys)) == [9] * 200
