"""In-process single-flight: one ``LocalFlight`` per (kind, key) per ``Dedup``.

Every coroutine of a process that calls the same key while a flight is open shares the
one ``LocalFlight``, so the process takes part in the Redis flight once: one submit, one
holder registration, one wait.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from dedupcall.models import Result
from dedupcall.worker import Attempt


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
    request_id: str | None = None
    waiters: int = 0
    executing: bool = False
    abandoned: bool = False
    outcome: str = "joined"  # how the first caller got its result: executed | joined | cached
    local_error: BaseException | None = None  # original exception when executed here
    future: asyncio.Future[Result] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    left: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    driver: asyncio.Task[Any] | None = None

    def resolve(self, result: Result, *, executed_here: bool = False, error: BaseException | None = None) -> None:
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
