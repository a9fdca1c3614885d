"""Frozen dataclasses the public API returns. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dedupcall.errors import CallFailed, FlightDropped, QueueCleared, ResponseTooLarge

_FAILURES: dict[str, type[CallFailed]] = {
    "QueueCleared": QueueCleared,
    "FlightDropped": FlightDropped,
    "ResponseTooLarge": ResponseTooLarge,
}


@dataclass(frozen=True)
class Result:
    """The outcome of one flight, as every caller of that flight sees it.

    ``cached`` is true when the result was already stored when this call or wait began;
    ``executed_by`` is the instance id that ran the successful or last attempt;
    ``outcome`` says how this caller got it: ``executed`` (its process ran the call),
    ``joined`` (it waited for another caller's run) or ``cached``. ``share`` (HTTP
    answers) says who else may receive it: None for anyone.
    """

    success: bool
    data: Any
    error: str | None
    request_id: str
    api_path: str
    attempts: int
    executed_by: str | None = None
    status_code: int | None = None
    error_type: str | None = None
    kind: str = "function"
    cached: bool = False
    outcome: str | None = None  # for this caller: executed | joined | cached
    share: dict[str, Any] | None = None  # who may receive an HTTP answer (httpcache)

    @classmethod
    def from_record(cls, record: dict[str, Any], *, cached: bool = False) -> Result:
        """Build from a decoded result record (see ``codec.result_record``)."""
        err = record.get("err") or {}
        return cls(
            success=bool(record["ok"]),
            data=record.get("data"),
            error=str(err.get("msg", "")) if not record["ok"] else None,
            error_type=str(err.get("type", "Error")) if not record["ok"] else None,
            request_id=str(record.get("id", "")),
            api_path=str(record.get("key", "")),
            attempts=int(record.get("att") or 0),
            executed_by=record.get("by"),
            status_code=record.get("status"),
            kind=str(record.get("kind", "function")),
            cached=cached,
            share=record.get("share"),
        )

    def to_error(self) -> CallFailed:
        """The ``CallFailed`` (or subclass) a caller of this failed flight receives."""
        etype = self.error_type or "Error"
        return _FAILURES.get(etype, CallFailed)(
            self.error or "",
            error_type=etype,
            attempts=self.attempts,
            request_id=self.request_id,
            key=self.api_path,
            status_code=self.status_code,
        )


@dataclass(frozen=True)
class InstanceInfo:
    """A live instance: ``last_seen`` is seconds since its last heartbeat."""

    id: str
    host: str
    pid: int
    last_seen: float
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueStatus:
    """A snapshot of the namespace's queue, as ``get_queue_status`` returns it."""

    queue_length: int
    processing: bool
    running: int
    delayed: int
    instance_id: str
    instances: list[InstanceInfo]
    config: dict[str, Any]


@dataclass(frozen=True)
class QueueItem:
    """One flight that has not finished: ``state`` is queued, delayed or running."""

    request_id: str
    key: str
    kind: str
    priority: int
    attempts: int
    state: str
    age: float
    executor: str | None
    waiters: int


@dataclass(frozen=True)
class Grant:
    """Permission to run one attempt of a flight, fenced by ``token``. ``digest`` names
    the flight's key, so a grant can find its caller before the submit reply has."""

    request_id: str
    token: str
    attempts: int
    lease_ms: int
    kind: str
    digest: str = ""

    @property
    def epoch(self) -> int:
        """The grant's place in the order of grants (a later grant has a larger one)."""
        head = self.token.partition(".")[0]
        return int(head) if head.isdigit() else 0

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Grant:
        """From a script's reply or a pushed grant; ``ValueError`` when malformed."""
        try:
            rid, token, att, lease, kind, digest = reply
            grant = cls(_text(rid), _text(token), int(att), int(lease), _text(kind), _text(digest))
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed grant {reply!r:.200}: {exc}") from None
        if not grant.request_id or not grant.token or grant.lease_ms <= 0:
            raise ValueError(f"malformed grant {reply!r:.200}")
        return grant


@dataclass(frozen=True)
class Restore:
    """What an executor needs to re-establish a running flight Redis forgot."""

    grant: Grant
    key: str
    priority: int = 0
    ttl_ms: int = -1
    cache_failures: bool = False
    fingerprint: str = ""
    credentials: str = ""
    payload: bytes = b""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
