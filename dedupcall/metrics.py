"""In-process counters and latency histograms of one instance. Pure: no I/O.

Cheap enough for the hot path (a lock, an increment, a bisect): a cache hit pays about a
microsecond for its count and its latency. ``snapshot()`` is plain JSON-ready data, which
the worker writes beside its heartbeat and ``Dedup.stats()`` returns.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from typing import Any

#: Upper bounds (seconds) of the latency buckets; one more bucket holds everything above.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("executed", "joined", "cached")
COUNTERS = (
    "executed",
    "joined",
    "cached",
    "failed",
    "queued",
    "queued_joined",
    "queued_cached",
    "executions",
    "retries",
    "failures",
    "lease_lost",
    "timeouts",
    "reconnects",
    "bypassed",
    "passed_through",
)


class Histogram:
    """Counts of observations per bucket of ``BUCKETS`` (not cumulative), and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, Any]:
        return {"count": sum(self.counts), "sum": self.total, "counts": list(self.counts)}


def quantile(snapshot: dict[str, Any], q: float) -> float | None:
    """Estimate the ``q`` quantile (0..1) of a histogram snapshot, interpolating linearly
    inside its bucket (as Prometheus' ``histogram_quantile`` does); None when empty."""
    counts: list[int] = snapshot.get("counts") or []
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low: float = BUCKETS[i - 1] if i > 0 else 0.0
            if i >= len(BUCKETS):
                return low  # above the last bound: all we know is "more than this"
            return low + (BUCKETS[i] - low) * max(0.0, rank - seen) / n
        seen += n
    return BUCKETS[-1]


class Metrics:
    """Counters (``COUNTERS``), the wait of callers by outcome and the duration of
    executions. Safe to update from any thread: entry points count from caller threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._wait = {outcome: Histogram() for outcome in OUTCOMES}
        self._execution = Histogram()

    def count(self, event: str, n: int = 1) -> None:
        with self._lock:
            self._counters[event] += n

    def call_done(self, outcome: str, seconds: float, *, failed: bool) -> None:
        """One caller got its result: count its outcome and how long it waited."""
        with self._lock:
            self._counters[outcome] += 1
            if failed:
                self._counters["failed"] += 1
            self._wait[outcome].observe(seconds)

    def execution_done(self, seconds: float) -> None:
        with self._lock:
            self._counters["executions"] += 1
            self._execution.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        """Counters at the top level; ``wait_seconds`` (by outcome) and
        ``execution_seconds`` as ``{"count", "sum", "counts"}`` over ``BUCKETS``."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out["wait_seconds"] = {k: h.snapshot() for k, h in self._wait.items()}
            out["execution_seconds"] = self._execution.snapshot()
        return out
