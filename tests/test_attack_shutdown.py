"""Attack: a graceful stop (aclose with a short drain_timeout) while the executor's work
cannot be taken back: blocking code run the way the README recommends for async callers
(``lambda: dedupcall.to_thread(blocking)``), or an HTTP request the upstream is already
serving. Handing such a flight to another instance would run it twice at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx

import dedupcall
from dedupcall import AsyncDedupTransport, Dedup, DedupError
from upstream import Upstream


async def joined_by_two(dedup: Dedup) -> None:
    """Until the running flight has a second waiting instance."""
    for _ in range(500):
        items = await dedup.get_queue_items()
        if items and items[0].waiters >= 2:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the second instance never joined")


async def test_aclose_never_hands_back_blocking_code_still_running_in_a_thread(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    stopping, staying = make_dedup(), make_dedup()
    await stopping.start()
    await staying.start()

    def blocking() -> int:  # e.g. a sync SDK call
        return int(httpx.get(f"{upstream.url}/thread?delay=1.0").json()["hit"])

    def fn() -> object:
        return dedupcall.to_thread(blocking)

    first = asyncio.create_task(stopping.call("/thread", fn, timeout=10))
    while upstream.hits("/thread") == 0:
        await asyncio.sleep(0.01)
    joined = asyncio.create_task(staying.call("/thread", fn, timeout=10))
    await joined_by_two(staying)
    await stopping.aclose(drain_timeout=0.1)  # the thread still runs the upstream call
    with contextlib.suppress(DedupError):
        await first
    assert await joined == 1
    assert upstream.hits("/thread") == 1 and upstream.peak() == 1


async def test_aclose_never_hands_back_a_request_the_upstream_is_serving(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    stopping, staying = make_dedup(), make_dedup()
    await stopping.start()
    await staying.start()
    url = f"{upstream.url}/served?delay=1.0"
    async with (
        httpx.AsyncClient(transport=AsyncDedupTransport(stopping)) as first_client,
        httpx.AsyncClient(transport=AsyncDedupTransport(staying)) as second_client,
    ):
        first = asyncio.create_task(first_client.get(url))
        while upstream.hits("/served") == 0:
            await asyncio.sleep(0.01)
        joined = asyncio.create_task(second_client.get(url))
        await joined_by_two(staying)
        await stopping.aclose(drain_timeout=0.1)  # the upstream already runs the request
        with contextlib.suppress(Exception):
            await first
        response = await joined
    assert response.status_code == 200
    assert upstream.hits("/served") == 1 and upstream.peak() == 1
