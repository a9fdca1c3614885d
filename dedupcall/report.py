"""One JSON-ready view of a namespace, shared by ``dedupcall status --json``, ``items``
and the status page: the queue, its flights, every live instance with its numbers, the
config, and counters summed over the instances. Pure: no I/O."""

from __future__ import annotations

import dataclasses
from typing import Any

from dedupcall.metrics import COUNTERS, OUTCOMES, quantile
from dedupcall.models import InstanceInfo, QueueItem, QueueStatus


def merged_wait(stats: dict[str, Any]) -> dict[str, Any]:
    """One histogram of every caller's wait, whatever its outcome."""
    counts: list[int] = []
    total = 0.0
    for outcome in OUTCOMES:
        hist = (stats.get("wait_seconds") or {}).get(outcome) or {}
        for i, n in enumerate(hist.get("counts") or []):
            if i >= len(counts):
                counts.append(0)
            counts[i] += int(n)
        total += float(hist.get("sum", 0.0))
    return {"count": sum(counts), "sum": total, "counts": counts}


def instance_view(info: InstanceInfo) -> dict[str, Any]:
    """An instance as JSON, with its p50 and p99 wait estimated from its histograms."""
    wait = merged_wait(info.stats)
    return {
        **dataclasses.asdict(info),
        "wait_p50": quantile(wait, 0.5),
        "wait_p99": quantile(wait, 0.99),
    }


def totals(instances: list[InstanceInfo]) -> dict[str, int]:
    """Counters summed over the live instances (a stopped instance's numbers go with it)."""
    out = dict.fromkeys(COUNTERS, 0)
    for info in instances:
        for name in COUNTERS:
            value = info.stats.get(name, 0)
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] += value
    return out


def status_view(status: QueueStatus, namespace: str) -> dict[str, Any]:
    """``get_queue_status()`` as JSON, plus ``namespace`` and ``totals``."""
    return {
        **dataclasses.asdict(status),
        "namespace": namespace,
        "instances": [instance_view(i) for i in status.instances],
        "totals": totals(status.instances),
    }


def item_view(item: QueueItem) -> dict[str, Any]:
    return dataclasses.asdict(item)
