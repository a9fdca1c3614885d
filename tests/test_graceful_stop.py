"""A graceful stop loses nothing: queued requests outlive the last instance, and a sync
function still running is never handed to another instance."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from dedupcall import Dedup
from procs import Spawner
from upstream import Upstream


def spec(redis_url: str, namespace: str, upstream: Upstream, **fields: Any) -> str:
    config = {"lock_timeout": 1.0, "heartbeat_interval": 0.2, **fields.pop("config", {})}
    return json.dumps(
        {"url": redis_url, "namespace": namespace, "upstream": upstream.url, "config": config}
        | fields
    )


async def test_queued_requests_survive_the_last_instance_stopping(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    paths = [f"/deploy/{i}?delay=0.3" for i in range(3)]
    first = spawn(
        "stopping.py",
        spec(
            redis_url,
            namespace,
            upstream,
            mode="queue",
            paths=paths,
            drain_timeout=3.0,
            config={"max_concurrent": 1},
        ),
    )
    ids = first.json(timeout=30)["request_ids"]
    assert upstream.hits() == 1  # the one that ran during the drain
    # The next deploy's instance runs what the last one left queued.
    after = make_dedup(max_concurrent=1)
    results = [await after.wait_for_result(rid, timeout=10) for rid in ids]
    assert [r.success for r in results] == [True] * 3, [r.error for r in results]
    assert [upstream.hits(f"/deploy/{i}") for i in range(3)] == [1, 1, 1]


async def test_a_queued_request_fails_only_past_its_deadline(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    # retention is shared: the request waits for a worker for 1 s from its submission
    config = {"max_concurrent": 1, "retention": 1.0}
    first = spawn(
        "stopping.py",
        spec(
            redis_url,
            namespace,
            upstream,
            mode="queue",
            paths=["/late/0?delay=0.2", "/late/1"],
            drain_timeout=3.0,
            config=config,
        ),
    )
    ids = first.json(timeout=30)["request_ids"]
    await asyncio.sleep(1.2)  # no worker alive past the deadline
    after = make_dedup(**config)
    late = await after.wait_for_result(ids[1], timeout=5)
    assert not late.success and late.error_type == "NoExecutor"
    assert upstream.hits("/late/1") == 0


async def test_close_never_hands_back_a_sync_function_that_still_runs(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    child = spawn(
        "stopping.py",
        spec(redis_url, namespace, upstream, mode="sync", key="k", seconds=2.0, drain_timeout=0.3),
    )
    child.wait_line("running")
    other = make_dedup()
    ran_here = 0

    async def same_call() -> str:
        nonlocal ran_here
        ran_here += 1
        return "ran twice"

    started = time.monotonic()
    value = await other.call("/sync/k", same_call, timeout=20)
    out = child.json(timeout=30)
    assert ran_here == 0 and upstream.hits("/value/sync/k") == 1
    assert value == out["value"]  # the child's run answered both instances
    assert out["close_seconds"] > 1.0  # close() waited past drain_timeout for the thread
    assert time.monotonic() - started < 10
