"""Log records of flight events under the ``dedupcall`` logger.

Every record carries ``event``, ``request_id``, ``key``, ``instance_id`` and ``attempt``
as ``extra`` fields, so a JSON formatter (or ``%(request_id)s`` in a format string) can
show them. Levels: INFO for what happens once per flight and process (queued, joined,
granted, executed, retried), WARNING for trouble (failed, lease lost, reaped), DEBUG for
cache hits, which are the hot path.
"""

from __future__ import annotations

import logging

log = logging.getLogger("dedupcall")

QUEUED, JOINED, CACHED, GRANTED = "queued", "joined", "cached", "granted"
EXECUTED, RETRIED, FAILED, LEASE_LOST, REAPED = (
    "executed",
    "retried",
    "failed",
    "lease lost",
    "reaped",
)
LEVELS = {
    QUEUED: logging.INFO,
    JOINED: logging.INFO,
    CACHED: logging.DEBUG,
    GRANTED: logging.INFO,
    EXECUTED: logging.INFO,
    RETRIED: logging.INFO,
    FAILED: logging.WARNING,
    LEASE_LOST: logging.WARNING,
    REAPED: logging.WARNING,
}


def flight_event(
    event: str,
    instance_id: str,
    *,
    request_id: str | None = None,
    key: str | None = None,
    attempt: int | None = None,
    detail: str = "",
    level: int | None = None,
) -> None:
    """Log one flight event at its level, or ``level`` (nothing is formatted when that
    level is off)."""
    level = LEVELS[event] if level is None else level
    if not log.isEnabledFor(level):
        return
    fields = {
        "event": event,
        "request_id": request_id,
        "key": key,
        "instance_id": instance_id,
        "attempt": attempt,
    }
    where = f" {key!r}" if key is not None else ""
    ids = [f"request {request_id}"] if request_id else []
    if attempt is not None:
        ids.append(f"attempt {attempt}")
    ident = f" ({', '.join(ids)})" if ids else ""
    log.log(level, "dedupcall flight %s%s%s%s", event, where, ident, detail, extra=fields)
