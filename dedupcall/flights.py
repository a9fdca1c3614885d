"""In-process single-flight: one ``LocalFlight`` per (kind, key) per ``Dedup``.

Every coroutine of a process that calls the same key while a flight is open shares the
one ``LocalFlight``, so the process takes part in the Redis flight once: one submit, one
holder registration, one wait.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dedupcall import codec
from dedupcall.aio import CancelledInside, within
from dedupcall.errors import SerializationError
from dedupcall.models import Grant, Result
from dedupcall.worker import Attempt, Outcome


@dataclass(eq=False)
class LocalFlight:
    """This process's share of one flight: its callers, its attempt, its outcome."""

    kind: str
    key: str
    digest: str
    attempt: Attempt
    priority: int
    ttl_ms: int
    cache_failures: bool
    payload: bytes = b""
    fingerprint: str = ""
    on_conflict: str = "join"
    credentials: str = ""  # digest of a queued request's credential headers
    fresh: bool = False  # a queued request that refuses a stored answer
    request_id: str | None = None
    ids: set[str] = field(default_factory=set)  # every id this flight was known by here
    waiters: int = 0
    unbounded: int = 0  # waiters without a timeout of their own
    outage_since: float | None = None  # Redis unreachable since (monotonic), while waiting
    executing: bool = False
    abandoned: bool = False
    outcome: str = "joined"  # how the first caller got its result: executed | joined | cached
    local_error: BaseException | None = None  # original exception when executed here
    future: asyncio.Future[Result] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    left: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    execution: asyncio.Task[Any] | None = None  # an attempt of ours running in its own task
    next_grant: Grant | None = None  # granted again while our attempt was completing

    def resolve(
        self, result: Result, *, executed_here: bool = False, error: BaseException | None = None
    ) -> None:
        """Set the flight's result once; later calls are ignored."""
        if self.future.done():
            return
        if result.cached:
            self.outcome = "cached"
        elif executed_here:
            self.outcome = "executed"
            self.local_error = error
        self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # mark retrieved: callers may all have left

    def abandon(self) -> None:
        """The last local caller left."""
        self.abandoned = True
        if not self.left.done():
            self.left.set_result(None)

    def revive(self) -> None:
        """A new caller arrived before the leave took effect."""
        self.abandoned = False
        if self.left.done():
            self.left = asyncio.get_running_loop().create_future()


def function_attempt(
    key: str,
    fn: Callable[[], Awaitable[Any] | Any],
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    instance_id: str,
    execution_timeout: Callable[[], float],
    name: str | None = None,
) -> Attempt:
    """The attempt of a function flight: run ``fn`` (bounded), encode what it returned."""
    what = name or getattr(fn, "__qualname__", repr(fn))

    async def attempt(grant: Grant) -> Outcome:
        fields: dict[str, Any] = {
            "request_id": grant.request_id,
            "key": key,
            "kind": "function",
            "attempts": grant.attempts,
            "executed_by": instance_id,
        }
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await within(value, execution_timeout())
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if sys.version_info < (3, 11):
                ours = not isinstance(exc, CancelledInside)
            else:
                ours = task is None or task.cancelling() > 0
            if ours:
                raise  # we are being cancelled (a shutdown): not the function's outcome
            # The function itself raised it (it awaited something cancelled): a failure.
            record = codec.result_record(
                ok=False, error_type="Cancelled", message=f"{what} was cancelled: {exc}", **fields
            )
            return Outcome(record, ok=False, error=exc)
        except Exception as exc:
            etype = "ExecutionTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            record = codec.result_record(
                ok=False, error_type=etype, message=str(exc)[:2000], **fields
            )
            return Outcome(record, ok=False, retryable=isinstance(exc, retry_on), error=exc)
        try:
            record = codec.result_record(ok=True, data=value, **fields)
        except SerializationError as exc:
            message = (
                f"{what} returned a value that is not JSON-serializable for key {key!r}: {exc}"
            )
            record = codec.result_record(
                ok=False, error_type="SerializationError", message=message, **fields
            )
            return Outcome(record, ok=False, error=SerializationError(message))
        return Outcome(record, ok=True)

    return attempt
