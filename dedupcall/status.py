"""Read-only views of a namespace: queue status, queue items, one flight."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio.client import Pipeline

from dedupcall import codec
from dedupcall.config import decode_shared
from dedupcall.errors import ConfigError, RedisUnavailable
from dedupcall.metrics import BUCKETS
from dedupcall.models import InstanceInfo, QueueItem, QueueStatus
from dedupcall.store import Store

FLIGHT_FIELDS = ["key", "kind", "prio", "att", "state", "created", "exec"]


def _ms(time_reply: tuple[int, int]) -> int:
    return int(time_reply[0]) * 1000 + int(time_reply[1]) // 1000


async def items(store: Store, ids: list[str]) -> list[QueueItem]:
    """The unfinished flights among ``ids``, in that order (finished ones are skipped)."""
    if not ids:
        return []

    def build(pipe: Pipeline) -> None:
        pipe.time()
        for rid in ids:
            pipe.hmget(store.keys.flight(rid), FLIGHT_FIELDS)
            pipe.scard(store.keys.holders(rid))

    replies = await store.pipeline(build, raise_on_error=False)
    if isinstance(replies[0], Exception):
        raise RedisUnavailable(f"{type(replies[0]).__name__}: {replies[0]}")
    now_ms = _ms(replies[0])
    out = []
    for i, rid in enumerate(ids):
        fields, holders = replies[1 + 2 * i], replies[2 + 2 * i]
        if not isinstance(fields, list):
            continue  # not a hash (hand-corrupted): the scripts fail it on their next pass
        key, kind, prio, att, state, created, executor = (
            f.decode("utf-8", "replace") if isinstance(f, bytes) else None for f in fields
        )
        if state is None:
            continue
        # Shown even when a field is malformed (as 0), so an operator can see it.
        out.append(
            QueueItem(
                request_id=rid,
                key=key or "",
                kind=kind or "",
                priority=_int(prio),
                attempts=_int(att),
                state=state,
                age=max(0.0, (now_ms - (_int(created) or now_ms)) / 1000),
                executor=executor,
                waiters=holders if isinstance(holders, int) else 0,
            )
        )
    return out


async def all_items(store: Store, limit: int | None = None) -> list[QueueItem]:
    """Running flights first, then queued ones by urgency, then delayed ones; at most
    ``limit`` of each."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be an int >= 1 or None, got {limit!r}")
    k, last = store.keys, -1 if limit is None else limit - 1
    running, queued, delayed = await store.pipeline(
        lambda p: (
            p.zrange(k.running, 0, last),
            p.zrange(k.queue, 0, last),
            p.zrange(k.delayed, 0, last),
        )
    )
    ids = [x.decode("utf-8", "replace") for x in [*running, *queued, *delayed]]
    return await items(store, ids)


async def active_ids(store: Store, key: str | bytes, kinds: list[str]) -> list[str]:
    """Ids of the unfinished flights for ``key``, one lookup per kind."""
    names = [store.keys.active(codec.key_digest(kind, key)) for kind in kinds]
    replies = await store.pipeline(lambda p: [p.get(name) for name in names], raise_on_error=False)
    return [rid.decode("utf-8", "replace") for rid in replies if isinstance(rid, bytes)]


async def queue_status(store: Store, local_config: dict[str, Any]) -> tuple[QueueStatus, list[str]]:
    """Counts, live instances (with their own counters) and the shared config, with the
    names of shared settings missing or malformed in Redis (``local_config`` stands in
    for them: for an instance, what it restores on its next call)."""
    k = store.keys
    now, queued, running, delayed, members = await store.pipeline(
        lambda p: (
            p.time(),
            p.zcard(k.queue),
            p.zcard(k.running),
            p.zcard(k.delayed),
            p.zrange(k.instances, 0, -1, withscores=True),
        )
    )
    cfg = await store.shared_config()
    now_ms = _ms(now)
    live = _live(members, now_ms)
    infos = (
        await store.pipeline(
            lambda p: [p.get(k.instance_info(i)) for i, _ in live], raise_on_error=False
        )
        if live
        else []
    )
    instances = []
    for (iid, expires), raw in zip(live, infos, strict=True):
        info = _json_object(raw)
        window = _number(info.get("window_ms"), 0.0, 1e12) or _number(info.get("hb_ms"), 0.0, 1e12)
        beat_at = expires - (window or store.hb_ms())
        stats = info.get("stats")
        instances.append(
            InstanceInfo(
                id=iid,
                host=_text(info.get("host")),
                pid=int(_number(info.get("pid"), 0, 2**31) or 0),
                last_seen=max(0.0, (now_ms - beat_at) / 1000),
                stats=_stats(stats),
            )
        )
    shared, bad = decode_shared(cfg)
    return (
        QueueStatus(
            queue_length=_count(queued),
            processing=_count(running) > 0,
            running=_count(running),
            delayed=_count(delayed),
            instance_id=store.instance_id,
            instances=instances,
            config={**local_config, **shared},
        ),
        bad,
    )


def _live(members: list[tuple[bytes, float]], now_ms: int) -> list[tuple[str, float]]:
    return [(m.decode("utf-8", "replace"), s) for m, s in members if s > now_ms]


def _int(text: str | None) -> int:
    try:
        value = int(text or 0)
    except ValueError:
        return 0
    return value if abs(value) < 2**53 else 0


def _count(reply: Any) -> int:
    return reply if isinstance(reply, int) else 0  # a structure of the wrong type: empty


def _json_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, (bytes, str)):
        return {}  # absent, or a key of the wrong type
    try:
        value = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if low <= value <= high else None


def _text(value: Any) -> str:
    return value[:255] if isinstance(value, str) else ""


def _stats(value: Any) -> dict[str, Any]:
    """An instance's counters as written beside its heartbeat: what is not a counter or a
    histogram of the expected shape is dropped, so one bad record cannot break a view."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for name, v in value.items():
        if not isinstance(name, str):
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[name] = v
        elif name == "wait_seconds" and isinstance(v, dict):
            hists = {o: h for o, h in v.items() if isinstance(o, str) and _histogram(h)}
            out[name] = hists
        elif name == "execution_seconds" and _histogram(v):
            out[name] = v
    return out


def _histogram(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    counts, total, count = value.get("counts"), value.get("sum"), value.get("count")
    return (
        isinstance(counts, list)
        and len(counts) <= len(BUCKETS) + 1
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
        and _number(total, 0, 1e18) is not None
        and isinstance(count, int)
        and not isinstance(count, bool)
        and count >= 0
    )
