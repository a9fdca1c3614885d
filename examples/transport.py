"""An httpx client whose concurrent identical GETs reach the upstream once per URL.

    python examples/transport.py [--calls 60] [--keys 3] [--delay 0.2] [--url redis://...]

``httpx.AsyncClient(transport=AsyncDedupTransport(dedup))`` sends ``--calls`` GETs at once
over ``--keys`` URLs, then the same GETs again (answered from the cache); a few identical
POSTs pass straight through (only GET and HEAD are deduplicated by default). Then a sync
``httpx.Client(transport=DedupTransport(dedup))`` is used from ``--calls`` threads at once.
Each response says what happened in ``response.extensions["dedupcall"]["outcome"]``.
Redis: ``--url``, else REDIS_URL (or REDIS_HOST...), else an embedded server.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

import _local
import httpx

from dedupcall import AsyncDedupTransport, Dedup, DedupTransport

POSTS = 5


async def run(url: str, namespace: str, upstream: _local.Upstream, calls: int, keys: int) -> int:
    """Every part; returns how many POSTs reached the upstream."""
    paths = [f"/api/items/{i % keys}" for i in range(calls)]
    async with (
        Dedup(url, namespace=namespace) as dedup,
        httpx.AsyncClient(transport=AsyncDedupTransport(dedup), base_url=upstream.url) as client,
    ):
        first = await asyncio.gather(*(client.get(path) for path in paths))
        show("async GETs, all at once", first)
        again = await asyncio.gather(*(client.get(path) for path in paths))
        show("the same GETs again", again)
        print(f"  upstream hits: {upstream.describe('GET /api/')}")

        order = {"item": 1, "quantity": 2}
        posts = await asyncio.gather(*(client.post("/orders", json=order) for _ in range(POSTS)))
        passed = sum("dedupcall" not in response.extensions for response in posts)
        print(f"{POSTS} identical POSTs: {passed} passed straight through (no dedupcall outcome)")
        print(f"  upstream hits: {upstream.describe('POST ')}")

        # The sync twin blocks its calling thread: use it from threads, not on this loop.
        with httpx.Client(transport=DedupTransport(dedup), base_url=upstream.url) as sync_client:
            sync_paths = [f"/sync/items/{i % keys}" for i in range(calls)]
            show("sync GETs from threads", await _local.in_threads(sync_client.get, sync_paths))
        print(f"  upstream hits: {upstream.describe('GET /sync/')}")
    return upstream.total("POST")


def show(title: str, responses: list[httpx.Response]) -> None:
    """How many responses were OK and what each caller's outcome was."""
    outcomes = Counter(response.extensions["dedupcall"]["outcome"] for response in responses)
    ok = sum(response.status_code == 200 for response in responses)
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    print(f"{title}: {len(responses)} requests, {ok} answered 200: {counts}")


def main(argv: list[str] | None = None) -> int:
    opts = _local.parser(__doc__, calls=60, keys=3).parse_args(argv)
    with _local.setup(opts, "transport") as (upstream, url, namespace):
        posted = asyncio.run(run(url, namespace, upstream, opts.calls, opts.keys))
    extra = f"; {posted} upstream calls for {POSTS} POSTs (passed through)"
    return _local.verdict(
        upstream.total("GET"), 2 * opts.keys, 3 * opts.calls, extra, ok=posted == POSTS
    )


if __name__ == "__main__":
    sys.exit(main())
