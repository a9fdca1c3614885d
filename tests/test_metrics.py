"""Counters, histograms and log events against a workload whose numbers are known."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from dedupcall import CallFailed, Dedup, DedupError, WaitTimeout
from dedupcall.metrics import BUCKETS, Histogram, quantile
from upstream import Upstream


async def test_counters_and_histograms_match_a_known_workload(dedup: Dedup) -> None:
    async def slow(value: int) -> int:
        await asyncio.sleep(0.05)
        return value

    flaky_runs = 0

    async def flaky() -> str:
        nonlocal flaky_runs
        flaky_runs += 1
        if flaky_runs < 3:
            raise ConnectionError("try again")
        return "ok"

    async def broken() -> None:
        raise ValueError("no")

    # 3 keys x 5 concurrent callers: 3 executed, 12 joined; then 2 cached hits per key.
    await asyncio.gather(*(dedup.call(f"/k/{i}", lambda i=i: slow(i)) for i in [0, 1, 2] * 5))
    await asyncio.gather(*(dedup.call(f"/k/{i}", lambda i=i: slow(i)) for i in [0, 1, 2] * 2))
    assert await dedup.call("/flaky", flaky, retry_on=ConnectionError) == "ok"
    with pytest.raises(CallFailed):
        await dedup.call("/broken", broken)

    stats = dedup.stats()
    calls = {k: stats[k] for k in ("executed", "joined", "cached", "failed")}
    assert calls == {"executed": 5, "joined": 12, "cached": 6, "failed": 1}
    # Executions: 3 slow + 3 flaky attempts + 1 broken; flaky retried twice; broken failed.
    assert (stats["executions"], stats["retries"], stats["failures"]) == (7, 2, 1)
    assert stats["lease_lost"] == 0
    waits = stats["wait_seconds"]
    assert {k: waits[k]["count"] for k in waits} == {"executed": 5, "joined": 12, "cached": 6}
    assert stats["execution_seconds"]["count"] == 7
    # Joiners waited for a 50 ms call: the estimate lands in the 25..100 ms buckets.
    p50 = quantile(waits["joined"], 0.5)
    assert p50 is not None and 0.025 <= p50 <= 0.1
    assert quantile(waits["cached"], 0.99) is not None
    assert quantile(waits["cached"], 0.99) < 0.05  # type: ignore[operator]


async def test_every_instance_writes_its_numbers_beside_its_heartbeat(
    make_dedup: Callable[..., Dedup],
) -> None:
    a, b = make_dedup(), make_dedup()
    await a.call("/shared", lambda: asyncio.sleep(0.05, result=1))
    await b.call("/shared", lambda: asyncio.sleep(0.05, result=1))  # cached
    await b.call("/other", lambda: asyncio.sleep(0, result=2))
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # each instance writes them at its next heartbeat
        instances = {i.id: i.stats for i in (await a.get_queue_status()).instances}
        if (
            instances.get(a.instance_id, {}).get("executed") == 1
            and instances.get(b.instance_id, {}).get("executed") == 1
        ):
            break
        assert asyncio.get_running_loop().time() < deadline, instances
        await asyncio.sleep(0.05)
    assert instances[b.instance_id]["cached"] == 1
    assert instances[b.instance_id]["wait_seconds"]["cached"]["count"] == 1
    assert instances[a.instance_id]["execution_seconds"]["count"] == 1


def test_histogram_buckets_and_quantile_estimates() -> None:
    h = Histogram()
    assert quantile(h.snapshot(), 0.5) is None
    for seconds in (0.0005, 0.003, 0.003, 0.2, 100.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap["count"] == 5 and snap["sum"] == pytest.approx(100.2065)
    assert snap["counts"][0] == 1  # <= 1 ms
    assert snap["counts"][BUCKETS.index(0.005)] == 2
    assert snap["counts"][-1] == 1  # above the last bound
    q = quantile(snap, 0.5)
    assert q is not None and 0.0025 < q <= 0.005
    assert quantile(snap, 1.0) == BUCKETS[-1]  # only known to be above it


async def test_flight_events_are_logged_with_their_fields(
    dedup: Dedup, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dedupcall"):
        await dedup.call("/logged", lambda: asyncio.sleep(0, result=1))
        await dedup.call("/logged", lambda: asyncio.sleep(0, result=1))  # a cache hit
    events = [(r.event, r.key, r.attempt) for r in caplog.records if hasattr(r, "event")]  # type: ignore[attr-defined]
    assert events == [
        ("queued", "/logged", None),
        ("granted", "/logged", 1),
        ("executed", "/logged", 1),
    ]
    for record in caplog.records:
        assert record.instance_id == dedup.instance_id  # type: ignore[attr-defined]
        assert record.request_id  # type: ignore[attr-defined]
        assert record.levelno == logging.INFO

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dedupcall"):
        await dedup.call("/logged", lambda: asyncio.sleep(0, result=1))
    assert [r.event for r in caplog.records if hasattr(r, "event")] == ["cached"]  # type: ignore[attr-defined]
    assert caplog.records[0].levelno == logging.DEBUG


async def test_retries_and_failures_are_logged(
    dedup: Dedup, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise ConnectionError("down")

    with caplog.at_level(logging.INFO, logger="dedupcall"), pytest.raises(CallFailed):
        await dedup.call("/down", broken, retry_on=ConnectionError)
    seen = [(r.event, r.attempt, r.levelno) for r in caplog.records if hasattr(r, "event")]  # type: ignore[attr-defined]
    retries = dedup.config.max_retries
    assert seen[-1] == ("failed", retries + 1, logging.WARNING)
    assert [e for e, _, _ in seen].count("retried") == retries
    assert "ConnectionError: down" in caplog.records[-1].getMessage()


async def test_prometheus_collector_exports_this_process(dedup: Dedup) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from dedupcall.prometheus import DedupCollector

    await asyncio.gather(
        *(dedup.call("/p", lambda: asyncio.sleep(0.01, result=1)) for _ in range(4))
    )
    registry = CollectorRegistry()
    registry.register(DedupCollector(dedup))
    text = generate_latest(registry).decode()
    label = f'instance="{dedup.instance_id}"'
    assert f'dedupcall_calls_total{{{label},outcome="executed"}} 1.0' in text
    assert f'dedupcall_calls_total{{{label},outcome="joined"}} 3.0' in text
    assert f"dedupcall_executions_total{{{label}}} 1.0" in text
    assert f'dedupcall_wait_seconds_count{{{label},outcome="joined"}} 3.0' in text
    assert f'dedupcall_execution_seconds_bucket{{{label},le="+Inf"}} 1.0' in text
    assert f'dedupcall_execution_seconds_bucket{{{label},le="0.001"}} 0.0' in text


async def test_queued_requests_and_every_timeout_are_counted_apart_from_calls(
    dedup: Dedup, upstream: Upstream
) -> None:
    url = f"{upstream.url}/value/q"
    rid = await dedup.add_get_request("/q", f"{url}?delay=0.2")
    assert await dedup.add_get_request("/q", f"{url}?delay=0.2") == rid  # joined
    await dedup.wait_for_result(rid, timeout=5)
    await dedup.add_get_request("/q", f"{url}?delay=0.2")  # answered from the cache
    slow = await dedup.add_get_request("/slow", f"{upstream.url}/value/slow?delay=0.5")
    with pytest.raises(WaitTimeout):
        await dedup.wait_for_result(slow, timeout=0.05)
    with pytest.raises(WaitTimeout):
        await dedup.call("/t", lambda: asyncio.sleep(0.5), timeout=0.05)
    stats = dedup.stats()
    queued = {k: stats[k] for k in ("queued", "queued_joined", "queued_cached")}
    assert queued == {"queued": 2, "queued_joined": 1, "queued_cached": 1}
    assert stats["timeouts"] == 2
    # Calls by outcome and their wait histograms count the same calls (none finished here).
    for outcome in ("executed", "joined", "cached"):
        assert stats[outcome] == stats["wait_seconds"][outcome]["count"] == 0


async def test_a_call_that_ends_without_a_result_counts_as_failed(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup()
    task = asyncio.create_task(dedup.call("/forever", lambda: asyncio.sleep(30)))
    while (await dedup.get_flight_by_key("/forever")) is None:
        await asyncio.sleep(0.01)
    await dedup.aclose(drain_timeout=0.05)
    with pytest.raises(DedupError):
        await task
    assert dedup.stats()["failed"] == 1
