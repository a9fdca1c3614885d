"""What counting, histograms and flight-event logging add per call, next to a raw Redis
round trip and to a cache hit measured in the same run.

    python benchmarks/bench_observability.py [--url redis://...] [--n N] [--json]

Rows: the in-process work each call does for its metrics (``Metrics.call_done``), the
per-execution work (``Metrics.execution_done``), the flight-event log call with its level
off and on (to a handler that discards), and a heartbeat's ``stats()`` snapshot; then
``PING`` and a cache hit through ``dedup.call``, with metrics as shipped. Without
``--url`` (or ``REDIS_URL``) a private server is started and stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from dedupcall import Dedup, events
from dedupcall.embedded import EmbeddedServer
from dedupcall.metrics import Metrics
from dedupcall.testing import purge


def per_call_ns(op: Callable[[], Any], n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean cost of ``op`` in ns, minus an empty loop's."""

    def mean(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - t0) / n

    empty = statistics.median(mean(lambda: None) for _ in range(rounds))
    return max(0.0, statistics.median(mean(op) for _ in range(rounds)) - empty)


async def async_median_us(op: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await op()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def in_process(n: int) -> dict[str, float]:
    metrics = Metrics()
    log = logging.getLogger("dedupcall")
    level, propagate = log.level, log.propagate
    rows = {
        "call_done_ns": per_call_ns(lambda: metrics.call_done("cached", 0.0002, failed=False), n),
        "execution_done_ns": per_call_ns(lambda: metrics.execution_done(0.01), n),
        "snapshot_ns": per_call_ns(metrics.snapshot, max(1, n // 10)),
    }

    def cached_event() -> None:
        events.flight_event(events.CACHED, "id", request_id="r", key="/k")

    log.setLevel(logging.INFO)  # DEBUG off: what a cache hit pays in production
    rows["event_level_off_ns"] = per_call_ns(cached_event, n)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = logging.NullHandler()
    log.addHandler(handler)
    rows["event_level_on_ns"] = per_call_ns(cached_event, max(1, n // 10))
    log.removeHandler(handler)
    log.setLevel(level)
    log.propagate = propagate
    return rows


async def against_redis(url: str, n: int) -> dict[str, float]:
    namespace = f"bench-{secrets.token_hex(6)}"
    client = aioredis.Redis.from_url(url)
    try:
        async with Dedup(url, namespace=namespace) as dedup:
            await dedup.call("/hit", lambda: asyncio.sleep(0, result=1), ttl=300)
            for _ in range(200):  # warm-up
                await client.ping()
                await dedup.call("/hit", lambda: asyncio.sleep(0, result=1))
            ping = await async_median_us(client.ping, n)
            hit = await async_median_us(
                lambda: dedup.call("/hit", lambda: asyncio.sleep(0, result=1)), n
            )
    finally:
        await client.aclose()
        await purge(url, namespace)
    return {"ping_us": ping, "hit_us": hit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--n", type=int, default=20000, help="calls per in-process row")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    rows: dict[str, Any] = in_process(opts.n)
    server = None if opts.url else EmbeddedServer()
    url = opts.url or server.start()  # type: ignore[union-attr]
    try:
        rows.update(asyncio.run(against_redis(url, max(500, opts.n // 10))))
    finally:
        if server is not None:
            server.stop()
    per_hit_ns = rows["call_done_ns"] + rows["event_level_off_ns"]
    rows["share_of_hit"] = per_hit_ns / (rows["hit_us"] * 1000)
    if opts.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'row':34}{'cost':>12}")
    for name in ("call_done_ns", "execution_done_ns", "event_level_off_ns",
                 "event_level_on_ns", "snapshot_ns"):  # fmt: skip
        print(f"{name:34}{rows[name]:>9.0f} ns")
    print(f"{'PING (floor)':34}{rows['ping_us']:>9.1f} us")
    ratio = rows["hit_us"] / rows["ping_us"]
    print(f"{'cache hit (dedup.call)':34}{rows['hit_us']:>9.1f} us  ({ratio:.2f} x PING)")
    share = rows["share_of_hit"]
    print(f"metrics + log check per cache hit: {per_hit_ns:.0f} ns = {share:.2%} of the hit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
