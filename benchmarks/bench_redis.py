"""What one call costs *inside Redis*: commands and server CPU per call, next to a plain GET.

    python benchmarks/bench_redis.py [--url redis://...] [--n N] [--callers C] [--json]

Counts what ``INFO commandstats`` counts: every command the server runs, the ``EVALSHA``
itself and each command a script runs, the instance's own heartbeats and sweeps included.
Server CPU is ``used_cpu_user + used_cpu_sys`` from ``INFO cpu``. Each phase is measured
from ``CONFIG RESETSTAT`` to its end, on a private server (or ``--url``; then the numbers
include whatever else that server does). The floor is a plain redis-py asyncio ``GET``
from ``--callers`` concurrent callers without pipelining, in the same run.

Phases: ``get`` (the floor), ``cold`` (``--n`` distinct keys through ``dedup.call``,
``--callers`` at a time, each runs once), ``hit`` (the same keys again: cached answers),
``idle`` (one started instance doing nothing for ``--idle`` seconds: commands a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer


async def snapshot(client: aioredis.Redis) -> tuple[Counter[str], float]:
    """Per-command call counts and the server's CPU seconds so far."""
    stats = await client.info("commandstats")
    calls = Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})
    cpu = await client.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(
    client: aioredis.Redis, work: Callable[[], Awaitable[None]]
) -> tuple[Counter[str], float, float]:
    """Run ``work``; return the commands the server ran, its CPU seconds and wall seconds.
    The two ``INFO`` calls of the closing snapshot are taken out of the counts."""
    await client.config_resetstat()
    before, cpu_before = await snapshot(client)
    start = time.perf_counter()
    await work()
    wall = time.perf_counter() - start
    after, cpu_after = await snapshot(client)
    ran = after - before
    ran["info"] -= 2
    ran["config|resetstat"] = 0
    return +ran, cpu_after - cpu_before, wall


async def bounded(n: int, callers: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """``one(0..n-1)``, ``callers`` at a time."""
    counter = iter(range(n))

    async def caller() -> None:
        for i in counter:
            await one(i)

    await asyncio.gather(*(caller() for _ in range(callers)))


def row(name: str, n: int, ran: Counter[str], cpu: float, wall: float) -> dict[str, Any]:
    total = sum(ran.values())
    return {
        "phase": name,
        "calls": n,
        "commands_per_call": round(total / n, 2),
        "cpu_us_per_call": round(cpu / n * 1e6, 2),
        "calls_per_s": round(n / wall),
        "top_commands": {k: round(v / n, 2) for k, v in ran.most_common(12)},
    }


async def run(url: str, n: int, callers: int, idle: float) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, max_connections=callers + 4)
    admin = aioredis.Redis.from_url(url)
    namespace = f"bench-{secrets.token_hex(4)}"
    rows = []
    try:
        await client.set(f"{namespace}:floor", b"x" * 64, ex=300)
        await client.ping()  # connections warm for the floor
        ran, cpu, wall = await measure(
            admin, lambda: bounded(n, callers, lambda i: client.get(f"{namespace}:floor"))
        )
        rows.append(row("get", n, ran, cpu, wall))

        dedup = Dedup(url, namespace=namespace, max_concurrent=callers * 2, result_ttl=300)
        await dedup.start()
        try:

            async def value(i: int) -> int:
                return i

            def call(i: int) -> Awaitable[Any]:
                return dedup.call(f"/bench/{i}", lambda: value(i))

            await bounded(callers, callers, lambda i: dedup.call(f"/warm/{i}", lambda: value(i)))
            for phase in ("cold", "hit"):
                ran, cpu, wall = await measure(admin, lambda: bounded(n, callers, call))
                rows.append(row(phase, n, ran, cpu, wall))
            ran, cpu, wall = await measure(admin, lambda: asyncio.sleep(idle))
            per_s = round(sum(ran.values()) / wall, 1)
            top = dict(ran.most_common(8))
            rows.append(
                {"phase": "idle", "seconds": idle, "commands_per_s": per_s, "top_commands": top}
            )
        finally:
            await dedup.aclose()
        server = await admin.info("server")
        floor = rows[0]
        for r in rows[1:3]:
            r["cpu_vs_get"] = round(r["cpu_us_per_call"] / floor["cpu_us_per_call"], 2)
        return {
            "server": f"{server.get('server_name', 'redis')} "
            f"{server.get('valkey_version') or server['redis_version']}",
            "python": platform.python_version(),
            "callers": callers,
            "rows": rows,
        }
    finally:
        async for key in admin.scan_iter(match=f"{namespace}:*", count=1000):
            await admin.delete(key)
        await client.aclose()
        await admin.aclose()


def show(result: dict[str, Any]) -> None:
    print(f"server {result['server']}, Python {result['python']}, {result['callers']} callers")
    head = ("phase", "calls", "cmds/call", "CPU us/call", "vs GET", "calls/s")
    print(" ".join(h.ljust(6) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(
        zip(head, (6, 7, 10, 12, 7, 9), strict=True))))  # fmt: skip
    for r in result["rows"]:
        if r["phase"] == "idle":
            print(
                f"idle: {r['commands_per_s']} commands/s over {r['seconds']} s: {r['top_commands']}"
            )
            continue
        print(
            f"{r['phase']:<6} {r['calls']:>7} {r['commands_per_call']:>10} "
            f"{r['cpu_us_per_call']:>12} {r.get('cpu_vs_get', 1.0):>7} {r['calls_per_s']:>9}"
        )
    for r in result["rows"][1:3]:
        print(f"{r['phase']} commands per call: {r['top_commands']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="Redis to use (default: a private server)")
    parser.add_argument("--n", type=int, default=3000, help="calls per phase")
    parser.add_argument("--callers", type=int, default=100, help="concurrent callers")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle phase")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    opts = parser.parse_args()
    if opts.url:
        result = asyncio.run(run(opts.url, opts.n, opts.callers, opts.idle))
    else:
        with EmbeddedServer() as server:
            result = asyncio.run(run(server.url, opts.n, opts.callers, opts.idle))
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
