"""What each entry point adds per call, over a direct call and over ``Dedup.call``, next to
the raw Redis round trip.

    python benchmarks/bench_entry.py [--url redis://...] [--n N] [--json]

Without ``--url`` (or ``REDIS_URL``) a private server is started with ``EmbeddedServer``
and stopped at the end. Every run uses a fresh random namespace and deletes its keys.
See benchmarks/README.md for what each row measures and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import json
import os
import platform
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
import wrapt

from dedupcall import AsyncDedupTransport, Dedup, DedupTransport, queued_api
from dedupcall.embedded import EmbeddedServer
from dedupcall.keys import KeySpace
from dedupcall.testing import purge

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import TTL, _hiredis_version, summary, upstream_process

HIT = 10**9  # the argument of every cache-hit call of a decorated function
BLOCK = 100  # calls per interleaved block
COUNTERS = ("executed", "joined", "cached")
AsyncOp = Callable[[int], Awaitable[Any]]
SyncOp = Callable[[int], Any]


async def twice(n: int) -> int:
    return 2 * n


def twice_sync(n: int) -> int:
    return 2 * n


def _time_sync(op: SyncOp, indices: range, out: list[int]) -> None:
    """A block of sync calls, timed in the thread that makes them."""
    for i in indices:
        t0 = time.perf_counter_ns()
        op(i)
        out.append(time.perf_counter_ns() - t0)


async def _time_async(op: AsyncOp, indices: range, out: list[int]) -> None:
    for i in indices:
        t0 = time.perf_counter_ns()
        await op(i)
        out.append(time.perf_counter_ns() - t0)


@dataclass
class Op:
    """One timed row: the call, which Dedup's counters it must move, and by how much."""

    call: AsyncOp | SyncOp
    dedup: Dedup | None = None
    counts: str | None = None  # the counter each timed call must add one to
    sync: bool = False  # made from the caller thread, else awaited on the script's loop
    samples: list[int] = field(default_factory=list)


@dataclass
class EntryBench:
    """One run: the async side (``a`` on the script's loop) and the sync side (``s`` on
    its own private loop thread, called from one caller thread)."""

    url: str
    server: str
    n: int
    upstream: str
    ns: str = field(default_factory=lambda: "bench-" + secrets.token_hex(6))
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    async def run(self) -> None:
        self.plain = aioredis.Redis.from_url(self.url)
        self.a = Dedup(self.url, namespace=self.ns)  # bound to this loop
        self.s = Dedup(self.url, namespace=self.ns)  # never started here: sync callers only
        # One caller thread for every sync row; its first call starts s's loop thread.
        self.caller = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="caller")
        self.http = httpx.AsyncClient()
        self.http_dedup = httpx.AsyncClient(transport=AsyncDedupTransport(self.a, ttl=TTL))
        self.shttp = httpx.Client()
        self.shttp_dedup = httpx.Client(transport=DedupTransport(self.s, ttl=TTL))
        meta = self.results["meta"] = {"server": self.server, "namespace": self.ns}
        try:
            await self.a.start()
            meta["redis_version"] = (await self.plain.info("server")).get("redis_version")
            meta.update(
                python=platform.python_version(),
                redis_py=redis.__version__,
                hiredis=_hiredis_version(),
                httpx=httpx.__version__,
                wrapt=wrapt.__version__,
                cpus=os.cpu_count(),
                n=self.n,
            )
            ops = self.ops()
            await self.prime()
            gc.collect()
            gc.freeze()
            await self.measure(ops)
            self.report(ops)
        finally:
            await self.close()
            self.results["problems"] = self.problems

    def in_caller(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self.caller, fn, *args)

    async def close(self) -> None:
        closers: list[Callable[[], Awaitable[Any]]] = [
            self.http.aclose,
            self.http_dedup.aclose,
            self.a.aclose,
            lambda: self.in_caller(self.shttp.close),
            lambda: self.in_caller(self.shttp_dedup.close),
            lambda: self.in_caller(self.s.close),  # closes it on its loop, stops the thread
        ]
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
        self.caller.shutdown()
        # Both instances are closed: every key of the namespace can go (purge uses SCAN).
        meta = self.results["meta"]
        with contextlib.suppress(Exception):
            meta["keys_deleted"] = await purge(self.url, self.ns)
        with contextlib.suppress(Exception):
            match = KeySpace(self.ns).prefix + "*"
            meta["keys_left"] = len([k async for k in self.plain.scan_iter(match=match)])
        await self.plain.aclose()
        if meta.get("keys_left") != 0:
            self.problems.append(f"cleanup: keys_left={meta.get('keys_left')} in {self.ns}")

    def ops(self) -> dict[str, Op]:
        """Every row. The reference for a decorated call is what it replaces by hand:
        ``dedup.call(f"/call/{n}", lambda: twice(n))``."""
        a, s, up = self.a, self.s, self.upstream
        dec = queued_api(path="/bench/{n}", dedup=a, ttl=TTL)(twice)
        sdec = queued_api(path="/bench-sync/{n}", dedup=s, ttl=TTL)(twice_sync)
        # The two transports share the namespace, hence the cache: distinct URLs.
        aget, sget = self.http_dedup.get, self.shttp_dedup.get
        return {
            "floor": Op(lambda i: self.plain.ping()),
            "direct": Op(twice),
            "direct_sync": Op(twice_sync, sync=True),
            "call_cold": Op(
                lambda i: a.call(f"/call/{i}", lambda: twice(i), ttl=TTL), a, "executed"
            ),
            "call_hit": Op(
                lambda i: a.call(f"/call/{HIT}", lambda: twice(HIT), ttl=TTL), a, "cached"
            ),
            "async_cold": Op(dec, a, "executed"),
            "async_hit": Op(lambda i: dec(HIT), a, "cached"),
            "sync_cold": Op(sdec, s, "executed", sync=True),
            "sync_hit": Op(lambda i: sdec(HIT), s, "cached", sync=True),
            "get_plain": Op(lambda i: self.http.get(f"{up}?n={i}")),
            "get_cold": Op(lambda i: aget(f"{up}?n={i}"), a, "executed"),
            "get_hit": Op(lambda i: aget(f"{up}?n=hit"), a, "cached"),
            "sget_plain": Op(lambda i: self.shttp.get(f"{up}?sync={i}"), sync=True),
            "sget_cold": Op(lambda i: sget(f"{up}?sync={i}"), s, "executed", sync=True),
            "sget_hit": Op(lambda i: sget(f"{up}?sync=hit"), s, "cached", sync=True),
        }

    async def prime(self) -> None:
        """Cache the hit keys, checking that each is a miss once and then a hit."""
        outcomes = []
        for _ in range(2):
            result = await self.a.call_result(f"/call/{HIT}", lambda: twice(HIT), ttl=TTL)
            outcomes.append(result.outcome)
        for _ in range(2):
            response = await self.http_dedup.get(f"{self.upstream}?n=hit")
            outcomes.append(response.extensions["dedupcall"]["outcome"])
        for _ in range(2):
            response = await self.in_caller(self.shttp_dedup.get, f"{self.upstream}?sync=hit")
            outcomes.append(response.extensions["dedupcall"]["outcome"])
        expected = ["executed", "cached"] * 3
        if outcomes != expected:
            self.problems.append(
                f"hit keys (call, async transport, sync transport): outcomes {outcomes}, "
                f"expected {expected}"
            )

    async def run_block(self, op: Op, indices: range) -> None:
        if op.sync:
            await self.in_caller(_time_sync, op.call, indices, op.samples)
        else:
            await _time_async(op.call, indices, op.samples)  # type: ignore[arg-type]

    async def measure(self, ops: dict[str, Op]) -> None:
        """Warm-up, then blocks of every row in turn, so drift hits them alike."""
        warm = min(200, self.n)
        for op in ops.values():
            await self.run_block(op, range(-warm, 0))
            op.samples.clear()
        moved: dict[str, dict[str, int]] = {name: dict.fromkeys(COUNTERS, 0) for name in ops}
        gc.collect()
        for start in range(0, self.n, BLOCK):
            for name, op in ops.items():
                before = op.dedup.stats() if op.dedup else {}
                await self.run_block(op, range(start, min(self.n, start + BLOCK)))
                if op.dedup:
                    after = op.dedup.stats()
                    for counter in COUNTERS:
                        moved[name][counter] += after[counter] - before[counter]
        # The paths really taken: each cold call executed here, each hit served from cache.
        for name, op in ops.items():
            if op.counts is None:
                continue
            want = {c: self.n if c == op.counts else 0 for c in COUNTERS}
            if moved[name] != want:
                self.problems.append(f"{name}: stats moved {moved[name]}, expected {want}")

    def report(self, ops: dict[str, Op]) -> None:
        r = self.results
        for name, op in ops.items():
            r[name] = summary(op.samples)
        for entry, base in (("async", "call"), ("sync", "call"), ("get", "get"), ("sget", "sget")):
            for phase in ("cold", "hit"):
                ref = f"{base}_{phase}" if base == "call" else f"{base}_plain"
                r[f"{entry}_{phase}_added"] = {
                    q: round(r[f"{entry}_{phase}"][q] - r[ref][q], 1)
                    for q in ("median_us", "p99_us")
                }


# --- output ------------------------------------------------------------------------------
ROWS = [
    ("1 floor: PING", "floor"),
    ("2 direct: await twice(n)", "direct"),
    ("2 direct: twice_sync(n), caller thread", "direct_sync"),
    ("2 dedup.call, cold", "call_cold"),
    ("2 dedup.call, hit", "call_hit"),
    ("2 @queued_api async, cold", "async_cold"),
    ("2 @queued_api async, hit", "async_hit"),
    ("2   added (- dedup.call), cold", "async_cold_added"),
    ("2   added (- dedup.call), hit", "async_hit_added"),
    ("2 @queued_api sync, thread, cold", "sync_cold"),
    ("2 @queued_api sync, thread, hit", "sync_hit"),
    ("2   added (- dedup.call), cold", "sync_cold_added"),
    ("2   added (- dedup.call), hit", "sync_hit_added"),
    ("3 httpx.AsyncClient GET, plain", "get_plain"),
    ("3 AsyncDedupTransport, cold", "get_cold"),
    ("3 AsyncDedupTransport, hit", "get_hit"),
    ("3   added (- plain), cold", "get_cold_added"),
    ("3   added (- plain), hit", "get_hit_added"),
    ("3 httpx.Client GET, plain", "sget_plain"),
    ("3 DedupTransport, cold", "sget_cold"),
    ("3 DedupTransport, hit", "sget_hit"),
    ("3   added (- plain), cold", "sget_cold_added"),
    ("3   added (- plain), hit", "sget_hit_added"),
]


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    floor = results["floor"]["median_us"]
    lines = [
        f"redis {meta['redis_version']} ({meta['server']}), python {meta['python']}, "
        f"redis-py {meta['redis_py']}, hiredis {meta['hiredis']}, httpx {meta['httpx']}, "
        f"wrapt {meta['wrapt']}, {meta['cpus']} cpus, n={meta['n']}",
        "",
        f"{'metric':<40}{'median µs':>12}{'p99 µs':>12}{'x PING':>9}",
    ]
    for label, name in ROWS:
        m = results[name]
        ratio = f"{m['median_us'] / floor:>9.1f}" if name != "floor" else ""
        lines.append(f"{label:<40}{m['median_us']:>12.1f}{m['p99_us']:>12.1f}{ratio}")
    lines.append(f"keys deleted {meta.get('keys_deleted')}, left {meta.get('keys_left')}")
    lines += [f"PROBLEM: {problem}" for problem in results["problems"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="Redis URL (default: $REDIS_URL, else a private embedded server)")
    p.add_argument("--n", type=int, default=2000, help="timed calls per row")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = args.url or os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if url is None:
            server = stack.enter_context(EmbeddedServer())
            url, where = server.url, f"embedded {server.engine.path}"
        else:
            where = "given URL"
        upstream = stack.enter_context(upstream_process())  # bench_core.py --serve-upstream
        bench = EntryBench(url, where, args.n, upstream)
        print(f"benchmarking {where}, namespace {bench.ns} ...", file=sys.stderr)
        asyncio.run(bench.run())
    print(json.dumps(bench.results, indent=2) if args.json else table(bench.results))
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
