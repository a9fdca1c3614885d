"""dedupcall.testing: what users' own tests lean on."""

from __future__ import annotations

import asyncio

import pytest

from dedupcall import Dedup, WaitTimeout
from dedupcall.testing import purge, throwaway_namespace, wait_until_idle


async def test_wait_until_idle_then_purge(redis_url: str) -> None:
    namespace = throwaway_namespace("mine")
    assert namespace.startswith("mine-") and namespace != throwaway_namespace("mine")
    async with Dedup(redis_url, namespace=namespace, max_concurrent=1) as dedup:
        gate = asyncio.Event()

        async def held() -> int:
            await gate.wait()
            return 1

        async def quick() -> int:
            return 2

        calls = [
            asyncio.create_task(dedup.call("/a", held)),
            asyncio.create_task(dedup.call("/b", quick)),
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(WaitTimeout, match="1 queued, 1 running"):
            await wait_until_idle(dedup, timeout=0.1)
        gate.set()
        await wait_until_idle(dedup, timeout=5)
        assert await asyncio.gather(*calls) == [1, 2]
    assert await purge(redis_url, namespace) > 0  # results, cache, config...
    assert await purge(redis_url, namespace) == 0  # nothing left
