"""One demo instance, a process of its own: ``python -m dedupcall.demo.instance``.

Its first stdin line is the spec, JSON (on stdin, not argv: the Redis URL may hold a
password): ``redis``, ``namespace``, ``upstream``, ``keys``, ``calls``, ``dedup``. The
instance fires ``calls`` GETs over ``keys`` through an ``httpx.AsyncClient`` (on an
``AsyncDedupTransport`` when ``dedup`` is true): half at once, the rest after those
finished. It talks to the demo over its pipes, one JSON object per line: ``{"ready": id}``
once connected, then it waits for a line on stdin (every instance starts together; an
end of input means the demo is gone, and it exits),
``{"done": n}`` as calls finish, and last ``{"latencies": {outcome: [seconds, ...]}}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx

from dedupcall.core import Dedup
from dedupcall.transport import AsyncDedupTransport

PROGRESS_EVERY = 0.1  # seconds between progress lines


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def fire(client: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, list[float]]:
    keys, calls = spec["keys"], spec["calls"]
    latencies: dict[str, list[float]] = {}
    done, last_report = 0, time.monotonic()

    async def one(i: int) -> None:
        nonlocal done, last_report
        start = time.perf_counter()
        response = await client.get(f"{spec['upstream']}{keys[i % len(keys)]}")
        response.raise_for_status()
        seconds = time.perf_counter() - start
        info = response.extensions.get("dedupcall")
        latencies.setdefault(info["outcome"] if info else "direct", []).append(seconds)
        done += 1
        if time.monotonic() - last_report >= PROGRESS_EVERY:
            last_report = time.monotonic()
            emit({"done": done})

    first = calls // 2 or calls  # the burst: these find no cached result yet
    await asyncio.gather(*(one(i) for i in range(first)))
    await asyncio.gather(*(one(i) for i in range(first, calls)))
    emit({"done": done})
    return latencies


async def go() -> bool:
    """Wait for the demo's start signal; False when its end of the pipe closed."""
    return bool(await asyncio.to_thread(sys.stdin.readline))


async def main(spec: dict[str, Any]) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(60.0)
    if not spec["dedup"]:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            emit({"ready": "direct"})
            if await go():
                emit({"latencies": await fire(client, spec)})
        return
    async with Dedup(spec["redis"], namespace=spec["namespace"]) as dedup:
        transport = AsyncDedupTransport(
            dedup, httpx.AsyncHTTPTransport(limits=limits), ttl=spec.get("ttl", 60.0)
        )
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            emit({"ready": dedup.instance_id})
            if not await go():
                return
            latencies = await fire(client, spec)
        emit({"latencies": latencies, "stats": dedup.stats()})


if __name__ == "__main__":
    line = sys.stdin.readline()
    if line:
        asyncio.run(main(json.loads(line)))
