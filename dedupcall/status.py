"""Read-only views of a namespace: queue status, queue items, one flight."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from dedupcall import codec
from dedupcall.config import decode_shared
from dedupcall.errors import ConfigError
from dedupcall.models import InstanceInfo, QueueItem, QueueStatus
from dedupcall.store import Store, redis_errors

FLIGHT_FIELDS = ["key", "kind", "prio", "att", "state", "created", "exec"]


def _ms(time_reply: tuple[int, int]) -> int:
    return int(time_reply[0]) * 1000 + int(time_reply[1]) // 1000


async def items(store: Store, ids: list[str]) -> list[QueueItem]:
    """The unfinished flights among ``ids``, in that order (finished ones are skipped)."""
    if not ids:
        return []
    pipe = store.redis.pipeline(transaction=False)
    pipe.time()
    for rid in ids:
        pipe.hmget(store.keys.flight(rid), FLIGHT_FIELDS)
        pipe.scard(store.keys.holders(rid))
    with redis_errors():
        replies = await pipe.execute()
    now_ms = _ms(replies[0])
    out = []
    for i, rid in enumerate(ids):
        fields, holders = replies[1 + 2 * i], replies[2 + 2 * i]
        key, kind, prio, att, state, created, executor = (
            f.decode("utf-8", "replace") if f is not None else None for f in fields
        )
        if state is None:
            continue
        with contextlib.suppress(TypeError, ValueError):  # malformed flight: not listed
            out.append(
                QueueItem(
                    request_id=rid,
                    key=key or "",
                    kind=kind or "",
                    priority=int(prio or 0),
                    attempts=int(att or 0),
                    state=state,
                    age=max(0.0, (now_ms - int(created or now_ms)) / 1000),
                    executor=executor,
                    waiters=int(holders),
                )
            )
    return out


async def all_items(store: Store, limit: int | None = None) -> list[QueueItem]:
    """Running flights first, then queued ones by urgency, then delayed ones; at most
    ``limit`` of each."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be an int >= 1 or None, got {limit!r}")
    k, last = store.keys, -1 if limit is None else limit - 1
    pipe = store.redis.pipeline(transaction=False)
    pipe.zrange(k.running, 0, last)
    pipe.zrange(k.queue, 0, last)
    pipe.zrange(k.delayed, 0, last)
    with redis_errors():
        running, queued, delayed = await pipe.execute()
    return await items(store, [x.decode() for x in [*running, *queued, *delayed]])


async def active_ids(store: Store, key: str | bytes, kinds: list[str]) -> list[str]:
    """Ids of the unfinished flights for ``key``, one lookup per kind."""
    names = [store.keys.active(codec.key_digest(kind, key)) for kind in kinds]
    with redis_errors():
        ids = await store.redis.mget(names)
    return [rid.decode() for rid in ids if isinstance(rid, bytes)]


async def queue_status(store: Store, local_config: dict[str, Any]) -> QueueStatus:
    """Counts, live instances (with their own counters) and the shared config."""
    k = store.keys
    pipe = store.redis.pipeline(transaction=False)
    pipe.time()
    pipe.zcard(k.queue)
    pipe.zcard(k.running)
    pipe.zcard(k.delayed)
    pipe.zrange(k.instances, 0, -1, withscores=True)
    pipe.hgetall(k.config)
    with redis_errors():
        now, queued, running, delayed, members, cfg = await pipe.execute()
        now_ms = _ms(now)
        live = [(m.decode(), score) for m, score in members if score > now_ms]
        infos = await store.redis.mget([k.instance_info(i) for i, _ in live]) if live else []
    instances = []
    for (iid, score), raw in zip(live, infos, strict=True):
        info = _json_object(raw)
        beat_at = score - info.get("hb_ms", store.hb_ms())
        instances.append(
            InstanceInfo(
                id=iid,
                host=str(info.get("host", "")),
                pid=int(info.get("pid", 0) or 0),
                last_seen=max(0.0, (now_ms - beat_at) / 1000),
                stats=info.get("stats", {}),
            )
        )
    return QueueStatus(
        queue_length=queued,
        processing=running > 0,
        running=running,
        delayed=delayed,
        instance_id=store.instance_id,
        instances=instances,
        config={**local_config, **decode_shared(cfg)},
    )


def _json_object(raw: bytes | str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
