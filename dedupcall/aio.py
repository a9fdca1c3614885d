"""asyncio helpers that never swallow a cancellation.

``asyncio.wait_for`` on Python 3.10/3.11 can swallow a cancellation that races its
timeout (CPython gh-86296); a worker whose stop request is swallowed never stops.
Python 3.11's ``asyncio.timeout`` does not, and needs no extra task.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

#: Set by the worker around each attempt it runs. The attempt calls ``pin(True)`` while it
#: waits on work that cannot be stopped (a sync function in a thread) and ``pin(False)``
#: after: a drain waits for a pinned attempt however long it takes, its lease renewed,
#: instead of handing back a flight whose function still runs.
attempt_pin: ContextVar[Callable[[bool], None] | None] = ContextVar(
    "dedupcall_attempt_pin", default=None
)


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Within an attempt, mark work that cannot be taken back (a thread, a request the
    upstream already serves): a drain waits for it instead of handing the flight back."""
    pin = attempt_pin.get()
    if pin is not None:
        pin(True)
    try:
        yield
    finally:
        if pin is not None:
            pin(False)


async def to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread`` for code inside a flight: run blocking ``fn`` in a thread.

    A thread cannot be stopped, so the attempt running it keeps its lease (and slot) until
    ``fn`` returns: a shutdown waits for it instead of handing the flight to another
    instance, and an ``execution_timeout`` does not start a retry beside it. Use it as
    ``await dedup.call(key, lambda: dedupcall.to_thread(blocking, arg))``.
    """
    with pinned():
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait({work})  # held until the thread returns
            if not work.cancelled():
                work.exception()  # retrieved: the attempt is over either way
            raise


class CancelledInside(asyncio.CancelledError):
    """The awaited code raised ``CancelledError`` although nobody cancelled the task
    awaiting it (it awaited something that was cancelled). Python 3.10 only, where a task
    cannot tell (no ``Task.cancelling()``): ``within`` sees it from outside its inner task."""


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds (None: no limit).

    On timeout the inner task is cancelled and ``TimeoutError`` raised; a cancellation of
    the caller cancels the inner task and always propagates.
    """
    if timeout is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        # No extra task; counts cancellations, so a stop request is never swallowed.
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                return await awaitable
        except TimeoutError:
            if limit.expired():
                raise TimeoutError(f"timed out after {timeout} s") from None
            raise
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TimeoutError(f"timed out after {timeout} s")
    if task.cancelled():  # neither we nor our caller cancelled it: it cancelled itself
        try:
            task.result()
        except asyncio.CancelledError as exc:
            raise CancelledInside(*exc.args) from None
    return task.result()


class Wakeup:
    """A sleep that another task can cut short; cancellation-safe."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._pending = False

    def set(self) -> None:
        """End the current (or next) sleep now."""
        self._pending = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds or until ``set()``."""
        if self._pending:
            self._pending = False
            return
        loop = asyncio.get_running_loop()
        self._future = loop.create_future()
        handle = loop.call_later(delay, self._wake, self._future)
        try:
            await self._future
        finally:
            handle.cancel()
            self._future = None
            self._pending = False

    @staticmethod
    def _wake(future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)


async def stop_task(task: asyncio.Task[object] | None, timeout: float = 5.0) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again if a cancellation was
    swallowed on the way (a library may turn it into a normal return)."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: a failure while stopping is not worth a warning
