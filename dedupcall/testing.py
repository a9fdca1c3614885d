"""Helpers for your own tests: a throwaway namespace, waiting until a namespace is idle
(instead of sleeping), and removing every key a namespace left behind."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from dedupcall.core import Dedup
from dedupcall.errors import WaitTimeout
from dedupcall.keys import KeySpace
from dedupcall.store import redis_errors


def throwaway_namespace(prefix: str = "test") -> str:
    """A namespace no other test uses: ``<prefix>-<random hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def wait_until_idle(dedup: Dedup, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Return once nothing is queued, delayed or running in ``dedup``'s namespace (every
    instance's flights count); ``WaitTimeout`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await dedup.get_queue_status()
        if status.queue_length == status.running == status.delayed == 0:
            return
        if loop.time() > deadline:
            raise WaitTimeout(
                f"namespace {dedup.namespace!r} still busy after {timeout} s: "
                f"{status.queue_length} queued, {status.running} running, {status.delayed} delayed"
            )
        await asyncio.sleep(interval)


async def purge(url: str, namespace: str) -> int:
    """Delete every key of ``namespace`` (results, cache, config, queues) once its
    instances are closed; returns how many. For tests only: it uses SCAN."""
    client = aioredis.Redis.from_url(url)
    prefix, removed = KeySpace(namespace).prefix, 0
    try:
        with redis_errors():
            names = [n async for n in client.scan_iter(match=prefix + "*", count=1000)]
            for i in range(0, len(names), 500):
                removed += int(await client.delete(*names[i : i + 500]))
    finally:
        await client.aclose()
    return removed
