"""The bridge for sync callers: a ``Dedup``'s event loop reached from any thread, and the
calling thread that runs a flight's sync function.

A sync caller blocks only its own thread. Its Redis work runs on the ``Dedup``'s loop (the
loop it is bound to, or a private loop thread started on first sync use). When the flight
is granted to this process, the attempt on the loop hands the function to a waiting
caller thread (the one that opened the flight, while it still waits) and awaits its value;
if every caller thread has left, a worker thread runs it, so a granted flight still ends.
A function running in a thread cannot be stopped: an attempt that times out or is
cancelled keeps its slot and lease until the function returns, so no retry overlaps it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from dedupcall.aio import pinned
from dedupcall.errors import DedupError, WaitTimeout

if TYPE_CHECKING:
    from dedupcall.core import Dedup

T = TypeVar("T")


class _Deadline(Exception):
    """A sync caller's own timeout passed (turned into ``WaitTimeout``)."""


Slot = tuple[str, "str | bytes"]  # (kind, key): the sync callers of one flight


class LoopThread:
    """An event loop running in a daemon thread until ``stop()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._running.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._running.set)
        try:
            self.loop.run_forever()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=5.0))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (its leftover tasks are cancelled) and wait for the thread."""
        if self._thread is threading.current_thread():
            raise DedupError("a Dedup's loop thread cannot stop itself")
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


@dataclass(eq=False)
class _Job:
    """One request, from the loop, that a caller thread run its function."""

    future: asyncio.Future[tuple[str, Any]]
    state: str = "posted"  # posted -> taken | returned | cancelled (under the bridge lock)


@dataclass(eq=False)
class _Caller:
    """One thread blocked in a sync call."""

    slot: Slot
    run: Callable[[], Any]
    inbox: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)
    finished: bool = False  # its call has an answer: it takes no more jobs
    busy: bool = False  # running a job now
    ran: bool = False  # ran a job: it waits for the flight's end, whatever its timeout


class SyncBridge:
    """Per ``Dedup``: the loop sync callers hand their work to, and the caller threads
    waiting on each flight. Once a private loop thread started, closing the ``Dedup``
    runs at interpreter exit too (daemon threads still run then)."""

    def __init__(self, dedup: Dedup) -> None:
        self._dedup = dedup
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._callers: dict[Slot, list[_Caller]] = {}
        self.thread: LoopThread | None = None  # the private loop thread, once started

    @property
    def forked(self) -> bool:
        """True in a child forked after this ``Dedup`` was made: its loop thread and its
        connections belong to the parent."""
        return os.getpid() != self._pid

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop to hand sync work to; starts the private one if unbound."""
        if self.forked:
            raise DedupError(
                "this Dedup was created before the process forked; create it (or call "
                "dedupcall.configure) in the child, after the fork"
            )
        loop = self._dedup._loop
        if loop is None:
            with self._lock:
                if self.thread is None:
                    self.thread = LoopThread(f"dedupcall-loop-{self._dedup.instance_id}")
                    atexit.register(self._dedup.close)
                loop = self.thread.loop
        if loop.is_closed() or not loop.is_running():
            raise DedupError(
                "this Dedup is bound to an event loop that is no longer running; "
                "create a Dedup per loop, or close it before its loop ends"
            )
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                raise DedupError(
                    "a sync call on the event loop its Dedup runs on would block that loop: "
                    "decorate an async function, or call this one from a thread "
                    "(asyncio.to_thread)"
                )
        return loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block this thread for its value."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop())
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise DedupError("the call was cancelled: its Dedup's loop stopped") from None
        finally:
            future.cancel()

    def call(
        self,
        kind: str,
        key: str | bytes,
        fn: Callable[[], Any],
        start: Callable[[Callable[[], Awaitable[Any]]], Coroutine[Any, Any, T]],
        timeout: float | None,
    ) -> T:
        """Block this thread on ``start(run_in_caller)``, run on the loop, for at most
        ``timeout`` seconds (``WaitTimeout``) unless this thread ran the function.

        ``run_in_caller()``, awaited on the loop by the flight's attempt, has a waiting
        caller thread of (``kind``, ``key``) run its own ``fn`` (this thread's, while it
        waits and is free) and returns the value or raises what ``fn`` raised.
        """
        if self._dedup._closed:
            raise DedupError("this Dedup is closed")
        loop = self.loop()
        me = _Caller((kind, key), fn)
        with self._lock:
            self._callers.setdefault(me.slot, []).append(me)
        deadline = None if timeout is None else time.monotonic() + timeout
        future: concurrent.futures.Future[T] | None = None
        try:
            future = asyncio.run_coroutine_threadsafe(start(lambda: self._run_in(me)), loop)
            future.add_done_callback(lambda _: self._finished(me))
            while (job := self._next(me, loop, deadline)) is not None:
                self._run_job(me, job, loop)
            try:
                return future.result()
            except concurrent.futures.CancelledError:
                raise DedupError("the call was cancelled: its Dedup's loop stopped") from None
        except _Deadline:
            self._dedup.count("timeouts")
            shown = self._dedup.shown_key(key)
            raise WaitTimeout(f"no result for {shown!r} within {timeout} s") from None
        finally:
            if future is not None and not future.done():
                future.cancel()  # this caller leaves the flight (a timeout, an interrupt)
            self._leave(me, loop)

    def _next(
        self, me: _Caller, loop: asyncio.AbstractEventLoop, deadline: float | None
    ) -> _Job | None:
        """The next job for this thread, or None once its call has an answer."""
        while True:
            wait = 1.0
            if deadline is not None and not me.ran:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise _Deadline
            try:
                return me.inbox.get(timeout=wait)
            except queue.Empty:
                if loop.is_closed() or not loop.is_running():
                    raise DedupError(
                        "the event loop of this Dedup stopped while a sync call waited"
                    ) from None

    # --- loop side -----------------------------------------------------------------
    async def _run_in(self, opener: _Caller) -> Any:
        with pinned():  # a thread cannot be stopped: no drain hands this flight back
            return await self._hand_to_thread(opener)

    async def _hand_to_thread(self, opener: _Caller) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            job = _Job(loop.create_future())
            with self._lock:
                target = self._pick(opener)
                if target is not None:
                    target.inbox.put(job)
            if target is None:
                # Every caller thread left after the grant: the flight still runs to its
                # end (its result is stored for everyone), in a worker thread.
                work = asyncio.ensure_future(asyncio.to_thread(opener.run))
                try:
                    return await asyncio.shield(work)
                except asyncio.CancelledError:
                    await asyncio.wait({work})  # held until it returns, as below
                    if work.done() and not work.cancelled():
                        work.exception()  # retrieved: the attempt is over either way
                    raise
            try:
                # Shielded: a cancellation must not cancel job.future itself, which the
                # thread still settles and which is awaited again below.
                kind, value = await asyncio.shield(job.future)
            except asyncio.CancelledError:  # execution_timeout, or a drain
                with self._lock:
                    taken = job.state == "taken"
                    if job.state == "posted":
                        job.state = "cancelled"
                if taken:
                    # The function runs on in its thread: hold this attempt (its slot and
                    # lease) until it returns, so no retry runs beside it. A second
                    # cancellation (a shutdown giving up) stops waiting.
                    await asyncio.shield(job.future)
                raise
            if kind == "value":
                return value
            if kind == "error":
                raise value
            # "returned": that thread left before taking it; hand it to another

    def _pick(self, opener: _Caller) -> _Caller | None:
        if not opener.finished and not opener.busy:
            return opener
        for caller in self._callers.get(opener.slot, ()):
            if not caller.finished and not caller.busy:
                return caller
        return None

    # --- caller-thread side ------------------------------------------------------------
    def _run_job(self, me: _Caller, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if job.state != "posted":
                return  # the attempt gave up on it meanwhile
            job.state = "taken"
            me.busy = me.ran = True
        interrupted: BaseException | None = None
        try:
            outcome: tuple[str, Any] = ("value", me.run())
        except Exception as exc:
            outcome = ("error", exc)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: fail it, then re-raise
            outcome = ("error", RuntimeError(f"the function was interrupted: {exc!r}"))
            interrupted = exc
        finally:
            me.busy = False
        _deliver(loop, job, outcome)
        if interrupted is not None:
            raise interrupted

    def _finished(self, me: _Caller) -> None:
        with self._lock:
            me.finished = True
            self._drop(me)
        me.inbox.put(None)

    def _leave(self, me: _Caller, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            me.finished = True
            self._drop(me)
            returned = []
            while True:
                try:
                    job = me.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.state == "posted":
                    job.state = "returned"
                    returned.append(job)
        for job in returned:
            _deliver(loop, job, ("returned", None))

    def _drop(self, me: _Caller) -> None:
        callers = self._callers.get(me.slot)
        if callers is not None and me in callers:
            callers.remove(me)
            if not callers:
                del self._callers[me.slot]

    def stop_thread(self) -> None:
        """Stop the private loop thread, if one was started."""
        with self._lock:
            thread, self.thread = self.thread, None
        if thread is not None:
            atexit.unregister(self._dedup.close)
            thread.stop()


def _deliver(loop: asyncio.AbstractEventLoop, job: _Job, outcome: tuple[str, Any]) -> None:
    def settle() -> None:
        if not job.future.done():
            job.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)
