"""Nothing leaks in an instance's memory: after flights end, whatever happened to them
(Redis restarted under them, callers timed out or left), its local maps are empty."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dedupcall import Dedup, DedupError
from dedupcall.embedded import EmbeddedServer


def local_state(dedup: Dedup) -> dict[str, int]:
    worker, notifier = dedup.worker, dedup._notifier
    return {
        "flights": len(dedup._local),
        "ids": len(dedup._by_id),
        "leases": len(worker._leases),
        "accepted": len(worker._accepted),
        "watchers": len(notifier._watchers),
    }


async def settled(dedup: Dedup) -> dict[str, int]:
    for _ in range(200):  # background tasks finish their last step
        state = local_state(dedup)
        if not any(state.values()):
            break
        await asyncio.sleep(0.01)
    return local_state(dedup)


async def test_no_local_state_is_left_after_flights_around_a_restart(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    server = make_redis_server()
    dedup = make_dedup(url=server.url, socket_timeout=1.0, poll_interval=0.3)
    await dedup.start()
    gate = asyncio.Event()

    async def held(i: int) -> int:
        await gate.wait()
        return i

    calls = [asyncio.create_task(dedup.call(f"/k/{i}", lambda i=i: held(i))) for i in range(10)]
    while dedup.worker.executing < 10:
        await asyncio.sleep(0.01)
    server.kill()  # every flight is lost; they are submitted again as new flights
    server.restart()
    await asyncio.sleep(0.5)
    gate.set()
    assert await asyncio.gather(*calls) == list(range(10))
    assert await settled(dedup) == dict.fromkeys(local_state(dedup), 0)


async def test_no_local_state_is_left_after_timeouts_and_cancellations(dedup: Dedup) -> None:
    gate = asyncio.Event()

    async def held() -> int:
        await gate.wait()
        return 1

    timeouts = [dedup.call(f"/t/{i}", held, timeout=0.1) for i in range(5)]
    outcomes = await asyncio.gather(*timeouts, return_exceptions=True)
    assert all(isinstance(o, DedupError) for o in outcomes)
    cancelled = [asyncio.create_task(dedup.call(f"/c/{i}", held)) for i in range(5)]
    await asyncio.sleep(0.05)
    for task in cancelled:
        task.cancel()
    await asyncio.gather(*cancelled, return_exceptions=True)
    gate.set()
    assert await settled(dedup) == dict.fromkeys(local_state(dedup), 0)
