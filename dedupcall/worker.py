"""The per-instance worker: runs granted attempts under a renewed lease, completes or
retries them, sweeps (heartbeat, reaper, due retries, shared config) and executes queued
HTTP requests.

An attempt is any ``Attempt``: a coroutine function taking the ``Grant`` and returning an
``Outcome``. Function flights bring their own (``core.py``); queued requests use
``http_attempt`` below. Nothing here decides who runs next: Lua does, and pushes grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx

from dedupcall import codec, events, httpcache, httpexec
from dedupcall.aio import Wakeup, attempt_pin, pinned, stop_task, within
from dedupcall.config import decode_shared
from dedupcall.errors import RedisUnavailable, SerializationError
from dedupcall.models import Grant, Restore, Result
from dedupcall.store import shared_values

if TYPE_CHECKING:
    from dedupcall.core import Dedup

log = logging.getLogger("dedupcall")

#: Passed as a queued request's ttl when deciding how long its answer may be stored: the
#: flight's own ttl (kept in Redis) applies, capped by the answer's stated freshness.
NO_CAP_MS = 2**53


@dataclass
class Outcome:
    """One attempt's result record, and whether to retry it."""

    record: bytes
    ok: bool
    retryable: bool = False
    retry_after_ms: int = 0
    error: BaseException | None = None  # the original exception, in this process only
    cache_ms: int = -1  # answers later callers for the flight's ttl, capped at this (0: never)
    keep_ms: int = -1  # kept for fetching by id this long (-1: the shared retention)


Attempt = Callable[[Grant], Awaitable[Outcome]]


@dataclass
class Finished:
    """How an execution ended for this process: a final result, or none yet (a retry is
    scheduled, or the lease was lost and nothing is stored)."""

    result: Result | None = None
    lost: bool = False
    error: BaseException | None = None


@dataclass
class _Lease:
    """One attempt running here. ``grant`` may be replaced by a newer grant of the same
    flight (``adopt``); ``lease_ms`` follows the shared ``lock_timeout`` as renewals
    report it."""

    grant: Grant
    lease_ms: int
    task: asyncio.Task[Any] | None = None
    lost: bool = False
    key: str | None = None  # readable key, for logs
    pinned: int = 0  # > 0 while it runs work that cannot be cancelled (see aio.attempt_pin)
    restore: Restore | None = None  # a queued request's record, should Redis forget it
    expires: float = 0.0  # monotonic time at which the lease runs out, as last renewed

    def pin(self, on: bool) -> None:
        self.pinned += 1 if on else -1


@dataclass
class Worker:
    """Background tasks of one ``Dedup``: sweep, lease renewal, attempts, queued requests."""

    dedup: Dedup

    def __post_init__(self) -> None:
        self.store = self.dedup.store
        self.metrics = self.dedup.metrics
        self._leases: dict[str, _Lease] = {}
        self._accepted: set[tuple[str, str]] = set()  # (request id, token) taken, not finished
        # Recently finished grants: a sweep's listing computed before a grant finished may
        # arrive after it did, and must not run the attempt a second time.
        self._finished: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweep_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._wake_sweep = Wakeup()
        self._wake_renew = Wakeup()  # a first lease started
        self._renew_now = Wakeup()  # lock_timeout changed: renew at once
        # Attempts running or still storing their outcome; a drain waits for none.
        self._active = 0
        self._idle = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._want_mine = True
        self._sweeps_ok = 0  # consecutive sweeps on time (see _steady)
        self._last_sweep_ok = 0.0
        self.draining = False
        self.started = time.time()

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweep_task = loop.create_task(self._sweep_loop(), name="dedupcall-sweep")
        self._renew_task = loop.create_task(self._renew_loop(), name="dedupcall-renew")

    async def drain(self, timeout: float) -> None:
        """Stop taking grants, let running attempts finish (and store their outcome) for
        ``timeout`` s, release the rest. An attempt running a sync function in a thread
        is never released (the thread cannot be stopped): it is waited for, however long
        it takes, with its lease renewed, and its outcome is stored."""
        self.draining = True
        # A grant taken just before the drain may have its attempt spawned but not yet
        # started (so not counted in _active): let such tasks take their first step.
        await asyncio.sleep(0)
        if self._active:
            with contextlib.suppress(TimeoutError):
                await within(self._idle.wait(), timeout)
        stopping = [
            lease.task
            for lease in self._leases.values()
            if lease.task is not None and not lease.task.done() and not lease.pinned
        ]
        for task in stopping:
            task.cancel()  # each hands its flight back (release) as it stops
        releasing = [t for t in self._tasks if t.get_name() == "dedupcall-release"]
        if stopping or releasing:
            await asyncio.wait([*stopping, *releasing], timeout=max(1.0, timeout))
        while any(lease.pinned for lease in self._leases.values()):
            log.warning(
                "dedupcall is waiting for a sync function still running in a thread before "
                "it stops (its flight cannot be handed back while it runs)",
                extra={"instance_id": self.dedup.instance_id},
            )
            with contextlib.suppress(TimeoutError):
                await within(self._idle.wait(), 5.0)

    async def stop(self) -> None:
        tasks = [t for t in (self._sweep_task, self._renew_task, *self._tasks) if t is not None]
        await asyncio.gather(*(stop_task(t) for t in tasks))
        if self._http is not None:
            await self._http.aclose()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked background task (kept referenced until done)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def executing(self) -> int:
        return len(self._leases)

    # --- grants ------------------------------------------------------------------
    def accept(self, grant: Grant) -> bool:
        """Take a grant to run it; False if it is already running or ran (a sweep's
        listing can repeat a grant we were pushed or given)."""
        ident = (grant.request_id, grant.token)
        if ident in self._accepted or ident in self._finished:
            return False
        self._accepted.add(ident)
        return True

    def on_grant(self, grant: Grant) -> None:
        """A grant pushed to (or returned to) this instance: run it, or give it back."""
        ident = (grant.request_id, grant.token)
        if ident in self._accepted or ident in self._finished or self.adopt(grant):
            # It runs (or ran) here: a sweep's listing repeats a grant we were given. Never
            # released, not even while draining: the attempt running it holds the lease.
            return
        if self.draining:
            self.spawn(self.release(grant, drop=False), "dedupcall-release")
            return
        self._accepted.add(ident)
        if grant.kind == "request":
            self.spawn(self.execute(grant, self.http_attempt), f"dedupcall-req-{grant.request_id}")
        elif not self.dedup._run_local_grant(grant):
            self.forget(grant)
            # No caller here holds the function any more: let another holder run it.
            self.spawn(self.release(grant, drop=True), "dedupcall-release")

    def forget(self, grant: Grant) -> None:
        """Un-take a grant that will not run here (it is given back)."""
        self._accepted.discard((grant.request_id, grant.token))

    def adopt(self, grant: Grant) -> bool:
        """A newer grant for a flight whose attempt already runs here (its lease lapsed,
        e.g. a loop stall, and the flight came back to us): that attempt carries on under
        the new token instead of a second, concurrent one starting."""
        lease = self._leases.get(grant.request_id)
        if lease is None or grant.epoch <= lease.grant.epoch:
            return False
        lease.grant, lease.lease_ms, lease.lost = grant, grant.lease_ms, False
        lease.expires = time.monotonic() + grant.lease_ms / 1000
        return True

    async def release(self, grant: Grant, *, drop: bool) -> None:
        """Give a grant back unrun; with ``drop``, stop holding its flight too."""
        with contextlib.suppress(RedisUnavailable):
            reply = await self.store.release(grant, drop=drop)
            if reply[0] == b"released":
                self.on_grants(reply[1])  # while draining, on_grant gives them back too

    def on_grants(self, replies: list[Any]) -> None:
        for reply in replies:
            try:
                grant = Grant.from_reply(reply)
            except ValueError as exc:  # never fatal: its lease runs out, the sweep hands it on
                log.warning("dedupcall ignored a grant: %s", exc)
                continue
            self.on_grant(grant)

    async def execute(self, grant: Grant, attempt: Attempt) -> Finished:
        """Run one attempt under its lease, then complete or retry it (fenced by the token)."""
        self._active += 1
        self._idle.clear()
        try:
            local = self.dedup._by_id.get(grant.request_id)
            key = local.key if local is not None else None  # a queued request's: read later
            tracing = self.dedup.tracing
            if tracing is None:
                return await self._execute(grant, attempt, key)
            return await tracing.execute(lambda: self._execute(grant, attempt, key), grant, key)
        finally:
            # Only now: a drain that stopped waiting between the attempt and its completion
            # closed the connections under the completion, and the result was lost.
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _execute(self, grant: Grant, attempt: Attempt, key: str | None) -> Finished:
        lease = _Lease(grant, grant.lease_ms, asyncio.current_task(), key=key)
        lease.expires = time.monotonic() + grant.lease_ms / 1000
        self._leases[grant.request_id] = lease
        self._wake_renew.set()
        rid = grant.request_id
        if grant.kind != "request":  # a queued request's key is known once its payload is read
            self._event(events.GRANTED, grant, lease.key)
        started = time.perf_counter()
        pin = attempt_pin.set(lease.pin)
        try:
            try:
                outcome = await attempt(grant)
            except asyncio.CancelledError:
                # Shutdown: hand the flight back at once instead of waiting for expiry.
                await asyncio.shield(self.release(lease.grant, drop=False))
                raise
            except Exception as exc:  # an attempt must not escape: fail the flight, typed
                record = codec.result_record(
                    ok=False,
                    request_id=rid,
                    key="",
                    kind=grant.kind,
                    attempts=grant.attempts,
                    executed_by=self.dedup.instance_id,
                    error_type="InternalError",
                    message=f"{type(exc).__name__}: {exc}",
                )
                outcome = Outcome(record, ok=False, error=exc)
        finally:
            attempt_pin.reset(pin)
            if self._leases.get(rid) is lease:
                del self._leases[rid]
            for ident in {(rid, grant.token), (rid, lease.grant.token)}:
                self._accepted.discard(ident)
                self._finished[ident] = None
            while len(self._finished) > 4096:
                self._finished.popitem(last=False)
        grant = lease.grant  # the newest grant of this flight: complete under its token
        self.metrics.execution_done(time.perf_counter() - started)
        try:
            return await asyncio.shield(self._finish(grant, outcome, lease))
        except RedisUnavailable as exc:
            # Not stored before the lease ran out: the flight runs again (or is
            # re-established) and its stored result answers everyone, our own callers
            # too. They never get an answer the others did not.
            log.warning(
                "dedupcall could not store a result before its lease ran out: %s",
                exc,
                extra={"request_id": rid, "instance_id": self.dedup.instance_id},
            )
            return Finished(lost=True)

    async def _finish(self, grant: Grant, outcome: Outcome, lease: _Lease) -> Finished:
        key = lease.key
        pause = 0.05
        reclaimed = False
        while True:  # Redis restarting, failing over: try again while the lease holds
            try:
                if outcome.retryable:
                    reply = await self.store.retry(grant, outcome.record, outcome.retry_after_ms)
                else:
                    reply = await self.store.complete(
                        grant, outcome.record, outcome.ok, outcome.cache_ms, outcome.keep_ms
                    )
                if reply[0] == b"gone" and not reclaimed:
                    # Redis forgot the flight while it ran here: re-establish it, then
                    # store what it produced, rather than let it run a second time.
                    reclaimed = True
                    if not await self._reclaim([lease]):
                        continue
                break
            except RedisUnavailable:
                # Past its lease the completion may still be accepted (fenced: only while
                # no one took the flight over), and after an outage every other instance
                # waits a sweep or two before judging leases: keep trying a while longer.
                config = self.dedup.config
                grace = max(config.lock_timeout, 2 * config.socket_timeout)
                if time.monotonic() + pause > lease.expires + grace:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.2)
        if reply[0] == b"gone":
            reply = [b"lost", None]  # not re-established: another run owns the key now
        verdict = reply[0].decode()
        if verdict == "lost":
            # A reply may have been lost on the way (the lone path repeats a command once):
            # the grants it carried are listed again by the next sweep.
            self.wake_sweep(mine=True)
        if verdict == "lost" and len(reply) > 1 and reply[1] == outcome.record:
            verdict = "ok"  # our own completion, repeated after a lost reply: it is stored
            reply = [b"ok", []]
        if verdict == "lost":
            self.metrics.count("lease_lost")
            self._event(events.LEASE_LOST, grant, key, " (completion refused)")
            stored = reply[1] if len(reply) > 1 else None
            result = self.dedup._decode_result(stored) if stored else None
            return Finished(result=result, lost=True)
        self.on_grants(reply[-1])
        if verdict == "retrying":
            self.metrics.count("retries")
            self._event(events.RETRIED, grant, key, f" (next attempt in {int(reply[1])} ms)")
            # The sweep promotes due retries; wake it when this one is due rather than
            # at the next heartbeat (a 10 ms backoff must not take a second).
            asyncio.get_running_loop().call_later(int(reply[1]) / 1000 + 0.001, self.wake_sweep)
            return Finished()
        result = Result.from_record(codec.decode_record(outcome.record))
        if result.success:
            self._event(events.EXECUTED, grant, key)
        else:
            self.metrics.count("failures")
            self._event(events.FAILED, grant, key, f": {result.error_type}: {result.error}")
        return Finished(result=result, error=outcome.error)

    def _event(self, event: str, grant: Grant, key: str | None, detail: str = "") -> None:
        events.flight_event(
            event,
            self.dedup.instance_id,
            request_id=grant.request_id,
            key=key,
            attempt=grant.attempts,
            detail=detail,
        )

    # --- queued HTTP requests ----------------------------------------------------
    async def http_attempt(self, grant: Grant) -> Outcome:
        """Attempt for a queued request: read its payload, send it, classify the response."""
        restore, raw = await self.store.flight_payload(grant)
        key = restore.key
        lease = self._leases.get(grant.request_id)
        if lease is not None:
            lease.key, lease.restore = key, restore
        self._event(events.GRANTED, grant, key)
        fields: dict[str, Any] = {
            "request_id": grant.request_id,
            "key": key,
            "kind": "request",
            "attempts": grant.attempts,
            "executed_by": self.dedup.instance_id,
        }
        try:
            method, url, headers, body = codec.decode_request(raw or b"")
        except ValueError as exc:
            record = codec.result_record(
                ok=False,
                error_type="MalformedFlight",
                message=f"stored request is malformed: {exc}",
                **fields,
            )
            return Outcome(record, ok=False)
        if self._http is None:
            self._http = httpx.AsyncClient()
        config = self.dedup.config
        timeout = config.execution_timeout
        label = codec.redact_secrets(url, config.secret_params)
        try:
            with pinned():  # once sent, a request cannot be taken back: a drain waits
                out = await within(
                    httpexec.send(self._http, method, url, headers, body, timeout, label),
                    timeout + 1.0,
                )
        except TimeoutError:
            out = httpexec.HttpOutcome(
                False, True, None, None, "Timeout", f"no response within {timeout} s"
            )
        sharing = None
        if out.status_code is not None:  # what a shared cache may do with this answer
            sharing = httpcache.decide(
                method,
                url,
                headers.items(),
                out.status_code,
                out.headers,
                NO_CAP_MS,
                credential_headers=config.credential_headers,
                secret=config.key_secret,
            )
        try:
            record = codec.result_record(
                ok=out.ok,
                data=out.data,
                status_code=out.status_code,
                error_type=out.error_type,
                message=out.message,
                share=sharing.record() if sharing else None,
                **fields,
            )
        except SerializationError as exc:  # pragma: no cover - JSON bodies always encode
            record = codec.result_record(
                ok=False, error_type="SerializationError", message=str(exc), **fields
            )
        cache_ms = -1
        if sharing is not None and sharing.cache_ms < NO_CAP_MS:
            cache_ms = sharing.cache_ms  # not storable (0), or capped by its freshness
        return Outcome(
            record,
            ok=out.ok,
            retryable=out.retryable,
            retry_after_ms=out.retry_after_ms,
            cache_ms=cache_ms,
        )

    # --- sweep: heartbeat, reaper, due retries, config -----------------------------
    def info(self) -> bytes:
        """What this instance tells others about itself (beside its heartbeat)."""
        return json.dumps(
            {
                "id": self.dedup.instance_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "hb_ms": self.store.hb_ms(),
                # How long a heartbeat keeps it alive (as reap.lua computes it).
                "window_ms": max(self.store.hb_ms(), int(self.dedup.config.lock_timeout * 1000)),
                "stats": self.dedup.stats(),
            }
        ).encode()

    def sweep_interval(self) -> float:
        """Seconds between sweeps: the heartbeat interval, but at least two per lease, so
        a lease shorter than a heartbeat interval is still recovered promptly."""
        config = self.dedup.config
        return min(config.heartbeat_interval, config.lock_timeout / 2)

    def _on_time(self) -> bool:
        """Whether our last sweep succeeded within three sweep intervals: no outage (of
        Redis, of our loop) came between, which would have silenced others too."""
        return time.monotonic() - self._last_sweep_ok < 3 * self.sweep_interval()

    def _steady(self) -> bool:
        """Whether our own sweeps ran without a gap lately: only then may this instance
        judge others' leases and heartbeats (after an outage everyone's lapsed alike, and
        everyone gets one heartbeat to catch up)."""
        return self._sweeps_ok >= 2 and self._on_time()

    async def _sweep_loop(self) -> None:
        while True:
            wait = self.sweep_interval()
            try:
                want_mine, self._want_mine = self._want_mine, False
                steady = self._steady()
                reply = await self.store.reap(self.info(), want_mine, steady)
                self._sweeps_ok = self._sweeps_ok + 1 if self._on_time() else 1
                self._last_sweep_ok = time.monotonic()
                grants, next_retry, next_lease, mine, config, reaped = reply
                if reaped:
                    events.flight_event(
                        events.REAPED,
                        self.dedup.instance_id,
                        detail=f": {reaped} flight(s) whose executor or holders stopped",
                    )
                self.on_grants(grants)
                self.on_grants(mine)
                self.dedup._apply_shared(decode_shared(shared_values(config))[0])
                for ms in (next_retry, next_lease):
                    if ms >= 0:
                        wait = min(wait, ms / 1000 + 0.002)
            except RedisUnavailable as exc:
                self._want_mine, self._sweeps_ok = True, 0
                log.warning(
                    "dedupcall sweep failed: %s", exc, extra={"instance_id": self.dedup.instance_id}
                )
            except Exception:  # never fatal: the sweep is what recovers everything else
                self._want_mine, self._sweeps_ok = True, 0
                log.exception(
                    "dedupcall sweep failed unexpectedly",
                    extra={"instance_id": self.dedup.instance_id},
                )
            # Spread instances' sweeps so they don't all hit Redis at the same instant.
            await self._wake_sweep.sleep(max(0.001, wait * random.uniform(0.9, 1.0)))

    def wake_sweep(self, *, mine: bool = False) -> None:
        """Sweep now; with ``mine``, also list grants made to us (a push may have been lost)."""
        self._want_mine = self._want_mine or mine
        self._wake_sweep.set()

    async def stop_sweeping(self) -> None:
        """Stop heartbeats and sweeps (the first step of a drain)."""
        await stop_task(self._sweep_task)
        self._sweep_task = None

    # --- lease renewal -----------------------------------------------------------
    async def _reclaim(self, leases: list[_Lease]) -> set[str]:
        """Re-establish running flights Redis forgot (it lost data), so their waiters join
        these runs instead of starting second ones; returns those it could not."""
        restores = []
        for lease in leases:
            restore = lease.restore or self.dedup.restore_of(lease.grant)
            if restore is not None:
                restores.append(replace(restore, grant=lease.grant))
        lost = {lease.grant.request_id for lease in leases} - {r.grant.request_id for r in restores}
        if restores:
            lost |= await self.store.reclaim(restores)
            log.warning(
                "dedupcall re-established %d running flight(s) Redis had lost",
                len(restores) - len(lost & {r.grant.request_id for r in restores}),
                extra={"instance_id": self.dedup.instance_id},
            )
        return lost

    def lease_changed(self) -> None:
        """The shared ``lock_timeout`` changed: renew every lease now, then at the new
        pace (a lease shortened from 30 s to 1 s must not wait out the old 10 s pause)."""
        lease_ms = int(self.dedup.config.lock_timeout * 1000)
        for lease in self._leases.values():
            lease.lease_ms = min(lease.lease_ms, lease_ms)
        self._renew_now.set()

    def renew_now(self) -> None:
        """Renew every lease at once (Redis lost data: what runs here is re-established);
        running nothing, say so at once: grants pause until every live instance has."""
        self._renew_now.set()
        if not self._leases:
            self.spawn(self._report_recovered(), "dedupcall-report")

    async def _report_recovered(self) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self.store.reclaim([])

    async def _renew_loop(self) -> None:
        failing = False
        while True:
            if not self._leases:
                await self._wake_renew.sleep(3600)
                continue
            # A third of the shortest lease; renewals report the current lock_timeout, and
            # a change of it cuts the pause short. After a failure, try again soon.
            interval = min(lease.lease_ms for lease in self._leases.values()) / 3000
            await self._renew_now.sleep(min(interval, 0.1) if failing else interval)
            sent = [(lease, lease.grant) for lease in self._leases.values() if not lease.lost]
            if not sent:
                continue
            sent_at = time.monotonic()
            try:
                lease_ms, lost_ids, gone = await self.store.renew([grant for _, grant in sent])
                if gone:
                    lost_ids |= await self._reclaim(
                        [lease for lease, g in sent if g.request_id in gone]
                    )
            except RedisUnavailable as exc:
                failing = True
                log.warning(
                    "dedupcall lease renewal failed: %s",
                    exc,
                    extra={"instance_id": self.dedup.instance_id},
                )
                continue
            failing = False
            for lease, grant in sent:
                if lease.grant is not grant or self._leases.get(grant.request_id) is not lease:
                    # adopted a newer grant, or finished, meanwhile: a reply about the past
                    continue
                if grant.request_id in lost_ids:
                    lease.lost = True
                    self._event(events.LEASE_LOST, grant, lease.key, " while running")
                else:
                    lease.lease_ms = lease_ms
                    lease.expires = sent_at + lease_ms / 1000
