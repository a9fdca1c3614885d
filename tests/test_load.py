"""Many concurrent callers in one process share a few connections without errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dedupcall import Dedup


async def test_thousands_of_callers_on_a_small_pool_never_see_too_many_connections(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(max_connections=4)

    async def value(i: int) -> int:
        await asyncio.sleep(0.01)
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
