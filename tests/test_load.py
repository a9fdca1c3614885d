"""Many concurrent callers in one process share a few connections without errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer


async def test_thousands_of_callers_share_a_small_pool(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    server = make_redis_server()
    dedup = make_dedup(url=server.url, max_connections=4)
    admin = aioredis.Redis.from_url(server.url, single_connection_client=True)
    one_at_a_time = asyncio.Lock()
    peak = 0

    async def value(i: int) -> int:
        nonlocal peak
        async with one_at_a_time:
            peak = max(peak, int((await admin.info("clients"))["connected_clients"]))
        return i

    keys = [f"/load/{i}" for i in range(1500)]
    results = await asyncio.gather(
        *[dedup.call(k, lambda i=i: value(i)) for i, k in enumerate(keys)],
        *[dedup.call(k, lambda: value(-1)) for k in keys[:500]],
    )
    assert results[:1500] == list(range(1500))
    assert results[1500:] == list(range(500))  # joined or cached: the first caller's value
    stats = dedup.stats()
    assert stats["executed"] == 1500 and stats["failed"] == 0
    # never "Too many connections": at most 3 batches of the pool of 4 in flight, the lone
    # connection, 2 control, 1-2 subscriber, and this test's own
    assert peak <= 3 + 1 + 2 + 2 + 1
    await admin.aclose()
