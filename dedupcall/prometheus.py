"""Prometheus export (``pip install "dedupcall[prometheus]"``).

Two ways in: ``render(status)`` is the text the status app's ``/metrics`` serves, the
whole namespace as one scrape (queue gauges, and every live instance's counters and
histograms from its heartbeat, labelled ``instance``); ``DedupCollector(dedup)`` puts one
process's own numbers into your registry (``REGISTRY.register(DedupCollector(dedup))``).
Scrape one or the other for a namespace, not both, or calls are counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from dedupcall.errors import ConfigError
from dedupcall.metrics import BUCKETS, OUTCOMES
from dedupcall.models import QueueStatus

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    AVAILABLE = False
    Collector = object  # type: ignore[assignment,misc]
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from dedupcall.core import Dedup

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Counter name -> (stats key, help). Calls by outcome are one family with a label.
_COUNTERS = {
    "dedupcall_executions": ("executions", "Attempts run by this instance's worker"),
    "dedupcall_retries": ("retries", "Attempts that failed and were scheduled again"),
    "dedupcall_failures": ("failures", "Flights whose final attempt here failed"),
    "dedupcall_lease_lost": ("lease_lost", "Attempts whose lease lapsed before completing"),
    "dedupcall_queued": ("queued", "Queued HTTP requests that opened a new flight"),
    "dedupcall_queued_joined": ("queued_joined", "Queued HTTP requests that joined a flight"),
    "dedupcall_queued_cached": ("queued_cached", "Queued HTTP requests answered from cache"),
    "dedupcall_timeouts": ("timeouts", "Callers whose wait ran out"),
    "dedupcall_reconnects": ("reconnects", "Reconnections of the subscriber connection"),
    "dedupcall_bypassed": ("bypassed", "Calls sent straight upstream while Redis was down"),
    "dedupcall_passed_through": ("passed_through", "Requests the transport does not dedup"),
}


def require() -> None:
    """Raise ``ConfigError`` saying how to install the extra when it is missing."""
    if not AVAILABLE:
        raise ConfigError('Prometheus export needs: pip install "dedupcall[prometheus]"')


def _buckets(hist: dict[str, Any]) -> list[tuple[str, float]]:
    counts = list(hist.get("counts") or [])
    counts += [0] * (len(BUCKETS) + 1 - len(counts))
    out, running = [], 0
    for bound, n in zip([*map(str, BUCKETS), "+Inf"], counts, strict=False):
        running += n
        out.append((bound, float(running)))
    return out


def families(instances: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """Metric families of every (instance id, ``Dedup.stats()``) pair."""
    require()
    pairs = list(instances)
    calls = CounterMetricFamily(
        "dedupcall_calls", "Calls by how the caller got its result", labels=["instance", "outcome"]
    )
    failed = CounterMetricFamily(
        "dedupcall_calls_failed", "Calls whose result was a failure", labels=["instance"]
    )
    wait = HistogramMetricFamily(
        "dedupcall_wait_seconds",
        "How long callers waited for their result",
        labels=["instance", "outcome"],
    )
    execution = HistogramMetricFamily(
        "dedupcall_execution_seconds", "How long attempts ran", labels=["instance"]
    )
    counters = {
        name: CounterMetricFamily(name, doc, labels=["instance"])
        for name, (_, doc) in _COUNTERS.items()
    }
    for iid, stats in pairs:
        for outcome in OUTCOMES:
            calls.add_metric([iid, outcome], float(stats.get(outcome, 0)))
            hist = (stats.get("wait_seconds") or {}).get(outcome) or {}
            wait.add_metric([iid, outcome], _buckets(hist), float(hist.get("sum", 0.0)))
        failed.add_metric([iid], float(stats.get("failed", 0)))
        hist = stats.get("execution_seconds") or {}
        execution.add_metric([iid], _buckets(hist), float(hist.get("sum", 0.0)))
        for name, (key, _) in _COUNTERS.items():
            counters[name].add_metric([iid], float(stats.get(key, 0)))
    yield from (calls, failed, *counters.values(), wait, execution)


def _queue_gauges(status: QueueStatus) -> Iterator[Metric]:
    for name, doc, value in (
        ("dedupcall_queue_length", "Flights waiting for a slot", status.queue_length),
        ("dedupcall_running", "Flights running now", status.running),
        ("dedupcall_delayed", "Flights waiting for their retry", status.delayed),
        ("dedupcall_instances", "Live instances", len(status.instances)),
    ):
        yield GaugeMetricFamily(name, doc, value=float(value))


class _Snapshot(Collector):
    def __init__(self, status: QueueStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from _queue_gauges(self.status)
        yield from families((i.id, i.stats) for i in self.status.instances)


def render(status: QueueStatus) -> bytes:
    """The Prometheus text exposition of a whole namespace, from ``get_queue_status()``."""
    require()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(status))
    return generate_latest(registry)


class DedupCollector(Collector):
    """This process's own numbers (``dedup.stats()``), for your Prometheus registry."""

    def __init__(self, dedup: Dedup) -> None:
        require()
        self.dedup = dedup

    def collect(self) -> Iterator[Metric]:
        yield from families([(self.dedup.instance_id, self.dedup.stats())])
