"""Latency and throughput of dedupcall's core paths, next to the raw Redis round trip.

    python benchmarks/bench_core.py [--url redis://...] [--n N] [--json]

Without ``--url`` (or ``REDIS_URL``) a private server is started with ``EmbeddedServer``
and stopped at the end. Every run uses a fresh random namespace and deletes its keys.
See benchmarks/README.md for what each row measures and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from dedupcall import Dedup
from dedupcall.embedded import EmbeddedServer

FANIN_WORK = 0.050  # seconds the fan-in function takes
TTL = 300.0  # results expire on their own even if cleanup is interrupted
Op = Callable[[int], Awaitable[Any]]


# --- statistics --------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: an observed value, never an interpolation."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(samples_ns: list[int]) -> dict[str, float]:
    values = sorted(s / 1000 for s in samples_ns)
    return {
        "median_us": round(statistics.median(values), 1),
        "p99_us": round(percentile(values, 0.99), 1),
        "max_us": round(values[-1], 1),  # a lost wake-up would show here as a poll interval
        "n": len(values),
    }


# --- the HTTP upstream -------------------------------------------------------------------
BODY = b'{"ok":true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or b"0")
    return 0


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on a keep-alive connection with the same small JSON body."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
            if b"connection: close" in head.lower():
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve_upstream() -> None:
    """Child-process mode: print the port, serve until the parent closes our stdin."""
    server = await asyncio.start_server(_handle, "127.0.0.1", 0, backlog=512)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()  # EOF: the parent is done (or died), so we never outlive it
    server.close()


@contextlib.contextmanager
def upstream_process() -> Iterator[str]:
    """The upstream in its own process, so its CPU is not charged to the measured loop."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-upstream"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError("the upstream process did not report its port")
        yield f"http://127.0.0.1:{int(line)}/item"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the benchmark -----------------------------------------------------------------------
@dataclass
class Bench:
    """One run: its clients, its two instances, and what it measured."""

    url: str
    n: int
    joined_keys: int
    callers: int
    keys: int
    fanin: int
    upstream: str
    ns: str = field(default_factory=lambda: "bench-" + secrets.token_hex(6))
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    async def run(self) -> None:
        self.plain = aioredis.Redis.from_url(self.url)
        self.http = httpx.AsyncClient()
        # Two objects = two instances (own id, subscriber, worker), here sharing one process
        # and one event loop.
        self.a = Dedup(self.url, namespace=self.ns)
        self.b = Dedup(self.url, namespace=self.ns)
        try:
            await self.a.start()
            await self.b.start()
            info = await self.plain.info("server")
            self.results["meta"] = {
                "redis_version": info.get("redis_version"),
                "namespace": self.ns,
                "python": platform.python_version(),
                "redis_py": redis.__version__,
                "hiredis": _hiredis_version(),
                "httpx": httpx.__version__,
                "cpus": os.cpu_count(),
                "n": self.n,
            }
            gc.collect()
            gc.freeze()  # setup objects out of the collector's way: fewer long GC pauses
            await self.sequential()
            await self.joined()
            await self.throughput()
            await self.fan_in()
        finally:
            await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.http.aclose()
        for dedup in (self.a, self.b):
            with contextlib.suppress(Exception):
                await dedup.aclose()
        deleted = 0
        with contextlib.suppress(Exception):
            batch: list[bytes] = []
            async for key in self.plain.scan_iter(match="{" + self.ns + "}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += await self.plain.delete(*batch)
                    batch.clear()
            if batch:
                deleted += await self.plain.delete(*batch)
        meta = self.results.setdefault("meta", {})
        meta["keys_deleted"] = deleted
        with contextlib.suppress(Exception):
            left = [k async for k in self.plain.scan_iter(match="{" + self.ns + "}:*", count=1000)]
            meta["keys_left"] = len(left)
            if left:
                self.problems.append(f"cleanup: {len(left)} keys of {self.ns} left")
        await self.plain.aclose()

    async def fetch(self) -> int:
        response = await self.http.get(self.upstream)
        return response.status_code

    # 1-4: sequential latencies, interleaved in blocks so drift hits every metric alike.
    async def sequential(self) -> None:
        a, run = self.a, self.ns

        async def const() -> int:
            return 1

        async def floor(i: int) -> Any:
            return await self.plain.ping()

        async def hit(i: int) -> Any:
            return await a.call("hit", const, ttl=TTL)

        async def cold(i: int) -> Any:
            return await a.call(f"cold:{run}:{i}", const, ttl=TTL)

        async def direct(i: int) -> Any:
            return await self.fetch()

        async def cold_upstream(i: int) -> Any:
            return await a.call(f"up:{run}:{i}", self.fetch, ttl=TTL)

        ops: dict[str, Op] = {
            "floor": floor,
            "hit": hit,
            "cold": cold,
            "direct": direct,
            "cold_upstream": cold_upstream,
        }
        first = await a.call_result("hit", const, ttl=TTL)
        second = await a.call_result("hit", const, ttl=TTL)
        if first.cached or not second.cached:
            self.problems.append(f"hit key: cached={first.cached}, then {second.cached}")
        warm = min(200, self.n)
        for op in ops.values():
            for i in range(-warm, 0):
                await op(i)
        before = a.stats()
        samples: dict[str, list[int]] = {name: [] for name in ops}
        block = 100
        gc.collect()
        for start in range(0, self.n, block):
            for name, op in ops.items():
                out = samples[name]
                for i in range(start, min(self.n, start + block)):
                    t0 = time.perf_counter_ns()
                    await op(i)
                    out.append(time.perf_counter_ns() - t0)
        after = a.stats()
        # The paths really taken: every hit served from cache, every cold call executed here.
        if after["cached"] - before["cached"] != self.n:
            self.problems.append(
                f"hit phase: {after['cached'] - before['cached']} cached of {self.n}"
            )
        if after["executed"] - before["executed"] != 2 * self.n:
            self.problems.append(
                f"cold phases: {after['executed'] - before['executed']} executed of {2 * self.n}"
            )
        for name, values in samples.items():
            self.results[name] = summary(values)
        self.results["upstream_added"] = {
            "median_us": round(
                self.results["cold_upstream"]["median_us"] - self.results["direct"]["median_us"], 1
            ),
            "p99_us": round(
                self.results["cold_upstream"]["p99_us"] - self.results["direct"]["p99_us"], 1
            ),
        }

    # 5: from the executor's function returning to a waiter on another instance having it.
    async def joined(self) -> None:
        a, b = self.a, self.b
        samples: list[int] = []
        release_at = 0
        for i in range(self.joined_keys):
            key = f"join:{self.ns}:{i}"
            started, gate = asyncio.Event(), asyncio.Event()

            async def gated(started: asyncio.Event = started, gate: asyncio.Event = gate) -> int:
                started.set()
                await gate.wait()
                return 7

            async def waiter(key: str = key) -> int:
                await b.call(key, gated, ttl=TTL)
                return time.perf_counter_ns()

            executor = asyncio.ensure_future(a.call(key, gated, ttl=TTL))
            await started.wait()
            other = asyncio.ensure_future(waiter())
            # Release only once B is a holder of A's flight (its submit returned "joined").
            while True:
                item = await a.get_flight_by_key(key, "function")
                if item is not None and item.waiters >= 2:
                    break
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0.001)  # let B's reply reach its task and register its watch
            release_at = time.perf_counter_ns()
            gate.set()
            done_at = await other
            await executor
            samples.append(done_at - release_at)
        if b.stats()["joined"] < self.joined_keys:
            self.problems.append(f"joined phase: B joined {b.stats()['joined']} times")
        self.results["joined"] = summary(samples)

    # 6: distinct keys, so dedup can only cost; how much of the direct throughput is left.
    async def throughput(self) -> None:
        rounds: dict[str, list[float]] = {"direct": [], "dedup": []}

        async def drive(mode: str, r: int, call: Callable[[str], Awaitable[Any]]) -> None:
            keys = iter([f"tp:{self.ns}:{r}:{i}" for i in range(self.keys)])

            async def caller() -> None:
                for key in keys:  # one shared iterator: M callers drain K keys
                    await call(key)

            gc.collect()
            t0 = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(self.callers)))
            elapsed = time.perf_counter() - t0
            rounds[mode].append(self.keys / elapsed)

        async def via_dedup(key: str) -> Any:
            return await self.a.call(key, self.fetch, ttl=TTL)

        async def direct(key: str) -> Any:
            return await self.fetch()

        for r in range(3):
            await drive("direct", r, direct)
            await drive("dedup", r, via_dedup)
        direct_rate = statistics.median(rounds["direct"])
        dedup_rate = statistics.median(rounds["dedup"])
        self.results["throughput"] = {
            "callers": self.callers,
            "keys": self.keys,
            "direct_per_s": round(direct_rate),
            "dedup_per_s": round(dedup_rate),
            "ratio": round(dedup_rate / direct_rate, 3),
            "rounds_per_s": {mode: [round(x) for x in xs] for mode, xs in rounds.items()},
        }

    # 7: a burst of callers of one key, split over both instances; one execution only.
    async def fan_in(self) -> None:
        beyond: list[int] = []
        after_fn: list[int] = []
        start_delay: list[int] = []
        executions: list[int] = []
        for r in range(3):
            key = f"fanin:{self.ns}:{r}"
            marks: dict[str, int] = {}
            count = 0

            async def slow(marks: dict[str, int] = marks) -> int:
                nonlocal count
                count += 1
                marks["start"] = time.perf_counter_ns()
                await asyncio.sleep(FANIN_WORK)
                marks["end"] = time.perf_counter_ns()
                return 42

            async def caller(dedup: Dedup, key: str = key) -> int:
                await dedup.call(key, slow, ttl=TTL)
                return time.perf_counter_ns()

            gc.collect()
            t0 = time.perf_counter_ns()
            dones = await asyncio.gather(
                *(caller(self.a if i % 2 == 0 else self.b) for i in range(self.fanin))
            )
            executions.append(count)
            start_delay.append(marks["start"] - t0)
            beyond += [d - t0 - int(FANIN_WORK * 1e9) for d in dones]
            after_fn += [d - marks["end"] for d in dones]
        if any(c != 1 for c in executions):
            self.problems.append(f"fan-in: executions per round {executions}, expected 1 each")
        self.results["fanin"] = {
            "callers": self.fanin,
            "executions": executions,
            "beyond_50ms": summary(beyond),
            "after_fn_returned": summary(after_fn),
            "start_delay_us": round(statistics.median(start_delay) / 1000, 1),
        }


def _hiredis_version() -> str | None:
    try:
        import hiredis
    except ImportError:
        return None
    return str(getattr(hiredis, "__version__", "?"))


# --- output ------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    floor = results["floor"]["median_us"]
    lines = [
        f"redis {meta['redis_version']} ({meta['server']}), python {meta['python']}, "
        f"redis-py {meta['redis_py']}, hiredis {meta['hiredis']}, {meta['cpus']} cpus, "
        f"n={meta['n']}",
        "",
        f"{'metric':<34}{'median µs':>12}{'p99 µs':>12}{'x PING':>9}",
    ]

    def row(label: str, name: str, ratio: bool) -> None:
        m = results[name]
        times = f"{m['median_us'] / floor:>9.1f}" if ratio else f"{'':>9}"
        lines.append(f"{label:<34}{m['median_us']:>12.1f}{m['p99_us']:>12.1f}{times}".rstrip())

    row("1 floor: PING", "floor", False)
    row("2 hit: cached key", "hit", True)
    row("3 cold: new key, fn returns 1", "cold", True)
    row("4 upstream direct (httpx)", "direct", False)
    row("4 cold via dedup + upstream", "cold_upstream", False)
    row("4 added by dedup (cold - direct)", "upstream_added", False)
    row("5 joined: release → B has value", "joined", True)
    tp, fi, ms = results["throughput"], results["fanin"], 1000.0
    beyond, after = fi["beyond_50ms"], fi["after_fn_returned"]
    lines += [
        "",
        f"4 dedup adds {results['upstream_added']['median_us'] / ms:.2f} ms (median) to an "
        f"upstream call of {results['direct']['median_us'] / ms:.2f} ms",
        f"6 throughput, {tp['callers']} callers x {tp['keys']} distinct keys: "
        f"direct {tp['direct_per_s']}/s, dedup {tp['dedup_per_s']}/s, ratio {tp['ratio']}",
        f"7 fan-in, {fi['callers']} callers of one key over A and B, fn {FANIN_WORK * ms:.0f} ms: "
        f"executions per round {fi['executions']}",
        f"  done beyond 50 ms: p50 {beyond['median_us'] / ms:.2f} ms, "
        f"p99 {beyond['p99_us'] / ms:.2f} ms",
        f"  (fn started {fi['start_delay_us'] / ms:.2f} ms after the burst; callers done "
        f"p50 {after['median_us'] / ms:.2f} / p99 {after['p99_us'] / ms:.2f} ms after it returned)",
    ]
    for problem in results["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="Redis URL (default: $REDIS_URL, else a private embedded server)")
    p.add_argument("--n", type=int, default=2000, help="sequential calls per latency metric")
    p.add_argument("--joined-keys", type=int, default=300, help="keys for the joined metric")
    p.add_argument("--callers", type=int, default=64, help="concurrent callers, throughput")
    p.add_argument("--keys", type=int, default=2000, help="distinct keys per throughput round")
    p.add_argument("--fanin", type=int, default=1000, help="concurrent callers of one key")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("n", "joined_keys", "callers", "keys", "fanin"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        asyncio.run(serve_upstream())
        return 0
    url = args.url or os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if url is None:
            server = stack.enter_context(EmbeddedServer())
            url, where = server.url, f"embedded {server.engine.path}"
        else:
            where = "given URL"
        upstream = stack.enter_context(upstream_process())
        bench = Bench(url, args.n, args.joined_keys, args.callers, args.keys, args.fanin, upstream)
        print(f"benchmarking {where}, namespace {bench.ns} ...", file=sys.stderr)
        asyncio.run(bench.run())
    results = {**bench.results, "problems": bench.problems}
    results["meta"]["server"] = where
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
