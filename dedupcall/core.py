"""Dedup: the async core. Function flights, queued requests, waits, status and config.

One ``Dedup`` is one instance: its own id, heartbeat, subscriber connection and worker.
It binds to the event loop it is first used on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from dedupcall import codec, events, httpcache, status
from dedupcall.aio import within
from dedupcall.bridge import SyncBridge
from dedupcall.config import (
    Config,
    check_shared,
    check_url,
    config_from_env,
    decode_shared,
    encode_shared,
    redact,
    url_from_env,
    validate,
    validate_call,
    validate_priority,
)
from dedupcall.errors import (
    CallFailed,
    ConfigError,
    ConflictError,
    DedupError,
    RedisUnavailable,
    UnknownRequest,
    WaitTimeout,
)
from dedupcall.flights import LocalFlight, function_attempt
from dedupcall.keys import KeySpace
from dedupcall.metrics import Metrics
from dedupcall.models import Grant, QueueItem, QueueStatus, Restore, Result
from dedupcall.notifier import Notifier
from dedupcall.store import Store
from dedupcall.worker import Attempt, Worker

if TYPE_CHECKING:
    from dedupcall.otel import Tracing

log = logging.getLogger("dedupcall")

Fn = Callable[[], Awaitable[Any] | Any]
RetryOn = type[BaseException] | tuple[type[BaseException], ...]


def _moved(result: Result) -> str | None:
    """The flight a result says its own was merged into (Redis had lost that run and its
    executor re-established it), or None."""
    if result.error_type == "Moved" and isinstance(result.data, dict):
        target = result.data.get("moved_to")
        return target if isinstance(target, str) else None
    return None


def _new_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def exception_types(value: Any) -> tuple[type[BaseException], ...]:
    """``retry_on`` as a tuple of exception classes, or ``ConfigError``."""
    types = (value,) if isinstance(value, type) else value
    if not isinstance(types, (tuple, list, set, frozenset)) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in types
    ):
        raise ConfigError(f"retry_on must be exception classes, got {value!r}")
    return tuple(types)


class Dedup:
    """Routes calls for the same key, from any number of processes, into one execution.

    ``async with Dedup(url, namespace="app") as dedup:`` starts this instance's worker and
    drains it on exit; without ``async with``, the first use starts it and ``aclose()``
    stops it. Values given here seed the namespace's shared config in Redis only where it
    is not set yet; afterwards Redis wins and ``update_config`` changes it everywhere.
    """

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", namespace: str = "dedupcall", **config: Any
    ) -> None:
        self.url = check_url(url)
        self.keys = KeySpace(namespace)
        self.namespace = namespace
        self.config = Config().with_values(**config)
        self.instance_id = _new_instance_id()
        self.metrics = Metrics()
        self.tracing: Tracing | None = None  # dedupcall.otel.instrument() sets it
        self._local: dict[tuple[str, str], LocalFlight] = {}
        self._by_id: dict[str, LocalFlight] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Future[None] | None = None
        self._ready = False
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        # Sync callers (sync decorated functions, DedupTransport) come in through here.
        self.sync = SyncBridge(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Dedup:
        """From ``REDIS_URL`` (or ``REDIS_HOST/PORT/PASSWORD/DB``), ``DEDUPCALL_NAMESPACE``
        and ``DEDUPCALL_<SETTING>`` variables; keyword ``overrides`` win."""
        env = os.environ if environ is None else environ
        url = url_from_env(env)
        if url is None:
            raise ConfigError("no Redis configured: set REDIS_URL or REDIS_HOST (REDIS_PORT, ...)")
        values = {**config_from_env(env), **overrides}
        namespace = values.pop("namespace", env.get("DEDUPCALL_NAMESPACE", "dedupcall"))
        return cls(url, namespace=namespace, **values)

    def __repr__(self) -> str:
        return (
            f"Dedup(url={redact(self.url)!r}, namespace={self.namespace!r}, "
            f"instance_id={self.instance_id!r})"
        )

    # --- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> Dedup:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect, seed config, subscribe and start the worker (idempotent).

        A closed ``Dedup`` starts again, as a new instance (an app's lifespan may run more
        than once, e.g. in tests); one running on the private loop of its sync callers
        moves to this loop (closed there, started here).
        """
        private = self.sync.thread
        here = asyncio.get_running_loop()
        if private is not None and self._loop is private.loop and here is not private.loop:
            await self.aclose()
        if self._closed:
            await self._reopen()
        await self._begin()

    async def _reopen(self) -> None:
        closing = self._closing
        if closing is not None and not closing.done():
            if closing.get_loop() is not asyncio.get_running_loop():
                raise DedupError("this Dedup is still closing on another event loop")
            await asyncio.shield(closing)
        self._closed, self._closing, self._starting, self._loop = False, None, None, None
        self.instance_id = _new_instance_id()

    async def _begin(self) -> None:
        if self._ready:
            self._check_loop()
            return
        if self._starting is None:
            self._loop = asyncio.get_running_loop()
            # Its own task: a first caller cancelled mid-start cancels neither the start
            # nor the other callers waiting for it.
            self._starting = self._loop.create_task(self._start(), name="dedupcall-start")
        self._check_loop()
        starting = self._starting
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            if not starting.cancelled():
                raise  # only this caller was cancelled
            self._starting = None
            raise DedupError("starting was cancelled") from None
        except BaseException:
            if self._starting is starting:
                self._starting = None  # the next use tries again
            raise

    def _check_loop(self) -> None:
        if self._loop is not asyncio.get_running_loop():
            raise DedupError("this Dedup is bound to another event loop; create one per loop")

    async def _start(self) -> None:
        try:
            await self._connect()
        except BaseException:
            if hasattr(self, "worker"):
                await self.worker.stop()
            if hasattr(self, "_notifier"):
                await self._notifier.stop()
            if hasattr(self, "store"):
                await self.store.close()
            raise
        self._ready = True

    async def _connect(self) -> None:
        self.store = Store(
            self.url, self.keys, self.instance_id, self.config, seed=self._seed_values
        )
        self.worker = Worker(self)
        self._notifier = Notifier(
            self.store.subscriber,
            self.keys,
            self.instance_id,
            on_grant=self.worker.on_grant,
            on_control=self._on_control,
            on_resubscribe=self._on_resubscribe,
        )
        shared = await self.store.init(encode_shared(self.config.shared()), self.worker.info())
        self._apply_shared(decode_shared(shared)[0])
        # Heartbeats start at once: on a slow link, subscribing takes round trips, and
        # an instance silent for that long would look dead to the others.
        self.worker.start()
        self._notifier.start()
        try:
            await within(
                asyncio.shield(self._notifier.first_subscribe), 2 * self.config.socket_timeout
            )
        except TimeoutError:
            raise RedisUnavailable("could not subscribe to notifications in time") from None
        except Exception as exc:
            raise RedisUnavailable(f"could not subscribe to notifications: {exc}") from exc

    async def aclose(self, *, drain_timeout: float | None = None) -> None:
        """Stop taking grants, let running attempts finish (``drain_timeout``, default the
        config's), hand the rest back, leave every flight, and close connections.
        Idempotent; the shutdown runs in its own task, so cancelling ``aclose`` does not
        leave the instance half-closed."""
        if drain_timeout is not None:
            validate({"drain_timeout": drain_timeout})
        private, here = self.sync.thread, asyncio.get_running_loop()
        if private is not None and self._loop is private.loop and here is not private.loop:
            # Bound to the private loop of sync callers: close there, then stop it.
            if private.loop.is_running():
                done = asyncio.run_coroutine_threadsafe(
                    self.aclose(drain_timeout=drain_timeout), private.loop
                )
                await asyncio.wrap_future(done)
            self._closed = True
            await asyncio.to_thread(self.sync.stop_thread)
            return
        if self._ready and self._loop is not here:
            raise DedupError("this Dedup runs on another event loop: close it there")
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._shutdown(drain_timeout))
        await asyncio.shield(self._closing)
        if private is not None and here is not private.loop:
            await asyncio.to_thread(self.sync.stop_thread)  # left over from a rebinding

    def close(self, *, drain_timeout: float | None = None) -> None:
        """The sync twin of ``aclose``, for code that used this ``Dedup`` only through sync
        callers: closes it on its loop and stops the private loop thread. Also runs at
        interpreter exit when that thread was started. In a forked child it only marks
        the ``Dedup`` closed: what it holds belongs to the parent."""
        if self.sync.forked:
            self._closed = True
            return
        loop = self._loop
        with contextlib.suppress(RuntimeError):  # RuntimeError: no loop runs here
            if loop is not None and asyncio.get_running_loop() is loop:
                raise DedupError("close() would block the loop this Dedup runs on: await aclose()")
        closing_done = self._closing is not None and self._closing.done()
        if loop is not None and loop.is_running() and not closing_done:
            self.sync.run(self.aclose(drain_timeout=drain_timeout))
        self._closed = True
        self.sync.stop_thread()

    async def _shutdown(self, drain_timeout: float | None) -> None:
        starting = self._starting
        if starting is not None and not starting.done():
            try:
                await asyncio.shield(starting)  # a start in progress finishes first
            except asyncio.CancelledError:
                if not starting.cancelled():
                    raise
            except Exception:  # a failed start left nothing running
                return
        if not self._ready:
            return
        self.worker.draining = True
        await self.worker.stop_sweeping()
        with contextlib.suppress(DedupError):
            await self.store.retire()  # no longer alive: nothing is granted to us any more
        await self.worker.drain(
            self.config.drain_timeout if drain_timeout is None else drain_timeout
        )
        closed = DedupError("this Dedup was closed while the call was waiting")
        for lf in list(self._local.values()):
            lf.fail(closed)
        await self.worker.stop()
        await self._notifier.stop()
        await self.store.close()
        self._ready = False

    async def _ensure(self) -> None:
        if not self._ready:
            if self._closed:
                raise DedupError("this Dedup is closed")
            await self._begin()
        elif self._loop is not asyncio.get_running_loop():
            self._check_loop()

    # --- config and notifications ------------------------------------------------------
    def _seed_values(self) -> tuple[dict[str, str], bytes]:
        # After Redis lost its data: the last shared config seen here (an operator's
        # update_config included), not this object's constructor values.
        return encode_shared(self.config.shared()), self.worker.info()

    def _apply_shared(self, values: dict[str, Any]) -> None:
        changed = {k: v for k, v in values.items() if getattr(self.config, k) != v}
        if changed:
            self.config = self.store.config = self.config.with_values(**changed)
            if "lock_timeout" in changed:
                self.worker.lease_changed()  # renew at the new pace now, not the old one

    def _on_control(self, message: str) -> None:
        if message == "config" and self._ready:
            self.worker.spawn(self._reload_config(), "dedupcall-config")
        elif message == "reclaim" and self._ready:
            self.worker.renew_now()  # Redis lost data: re-establish what runs here, now

    def restore_of(self, grant: Grant) -> Restore | None:
        """What re-establishes a function or transport flight running here, should Redis
        forget it (None when no caller here holds it)."""
        lf = self._by_id.get(grant.request_id)
        if lf is None:
            return None
        return Restore(
            grant,
            lf.key,
            priority=lf.priority,
            ttl_ms=lf.ttl_ms,
            cache_failures=lf.cache_failures,
            fingerprint=lf.fingerprint,
            credentials=lf.credentials,
            payload=lf.payload,
        )

    async def _reload_config(self) -> None:
        with contextlib.suppress(RedisUnavailable):
            self._apply_shared(decode_shared(await self.store.shared_config())[0])

    async def _on_resubscribe(self, unreachable: bool) -> None:
        # Anything finished or granted while we were unsubscribed: look again.
        self._notifier.wake_all()
        if not self._ready:
            return
        self.worker.wake_sweep(mine=True)
        self.worker.renew_now()  # were our flights lost meanwhile? re-establish them now
        if unreachable:
            # Redis went away (a restart, a failover?) and may have lost flights that
            # still run: pause grants while every executor re-establishes its own (a
            # failover keeps the config, so nothing else would say so).
            self.worker.spawn(self._recover_quietly(), "dedupcall-recover")

    async def _recover_quietly(self) -> None:
        with contextlib.suppress(DedupError):
            await self.store.recover()

    @staticmethod
    def _decode_result(raw: bytes | str, *, cached: bool = False) -> Result:
        try:
            return Result.from_record(codec.decode_record(raw), cached=cached)
        except (ValueError, KeyError, TypeError) as exc:
            return Result(
                False,
                None,
                f"stored result is malformed: {exc}",
                "",
                "",
                0,
                error_type="MalformedResult",
                cached=cached,
            )

    async def _submit(self, lf: LocalFlight, rid: str) -> list[Any]:
        return await self.store.submit(
            kind=lf.kind,
            key=lf.key,
            digest=lf.digest,
            rid=rid,
            priority=lf.priority,
            ttl_ms=lf.ttl_ms,
            cache_failures=lf.cache_failures,
            fingerprint=lf.fingerprint,
            credentials=lf.credentials,
            on_conflict=lf.on_conflict,
            payload=lf.payload,
            may_grant=not self.worker.draining,
            fresh=lf.fresh,
        )

    # --- function flights ----------------------------------------------------------
    async def call(
        self,
        key: str | bytes,
        fn: Fn,
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = None,
        retry_on: RetryOn = (),
        cache_failures: bool = False,
    ) -> Any:
        """Run ``fn`` once for ``key`` across every instance and return its value.

        Callers of the same key share one execution and its outcome; a success is served
        to later callers for ``ttl`` seconds (default ``result_ttl``). Raises ``CallFailed``
        (``__cause__`` is the original exception in the process that ran it), ``WaitTimeout``
        after ``timeout`` seconds, or ``RedisUnavailable``. ``retry_on`` names the exception
        types worth another attempt (with backoff, up to ``max_retries``).

        ``fn`` takes no arguments and is async (or returns an awaitable); it runs on the
        event loop, so wrap blocking code: ``lambda: dedupcall.to_thread(blocking)`` (not
        ``asyncio.to_thread``: a shutdown would hand back a flight whose thread runs on).
        """
        result, error = await self.run_flight(
            "function",
            key,
            self.make_function_attempt(fn, exception_types(retry_on)),
            priority=priority,
            ttl=ttl,
            timeout=timeout,
            cache_failures=cache_failures,
        )
        if result.success:
            return result.data
        raise result.to_error() from error

    async def call_result(
        self,
        key: str | bytes,
        fn: Fn,
        *,
        retry_on: RetryOn = (),
        **options: Any,
    ) -> Result:
        """Like ``call``, but returns the ``Result`` instead of raising ``CallFailed``."""
        make_attempt = self.make_function_attempt(fn, exception_types(retry_on))
        result, _ = await self.run_flight("function", key, make_attempt, **options)
        return result

    def make_function_attempt(
        self, fn: Fn, retry_on: tuple[type[BaseException], ...], name: str | None = None
    ) -> Callable[[str], Attempt]:
        """The attempt factory of a function flight: run ``fn`` (bounded by
        ``execution_timeout``), encode its value; ``name`` labels it in errors."""
        return lambda key: function_attempt(
            key, fn, retry_on, self.instance_id, lambda: self.config.execution_timeout, name
        )

    async def run_flight(
        self,
        kind: str,
        key: str | bytes,
        make_attempt: Callable[[str], Attempt],
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = None,
        cache_failures: bool = False,
        partition: str = "",
    ) -> tuple[Result, BaseException | None]:
        """Take part in the flight of (``kind``, ``key``): the building block of ``call``
        and of the entry points, which bring their own attempt.

        ``make_attempt(readable_key)`` is called only when this process opens a new local
        flight; joiners build nothing. ``partition`` (e.g. a digest of credentials) keeps
        callers of one key apart without showing in the readable key. Returns the
        ``Result`` (its ``outcome`` set for this caller) and, for callers in the process
        that executed it, the original exception.
        """
        tracing = self.tracing
        if tracing is not None:
            return await tracing.call(
                lambda: self._run_flight(
                    kind, key, make_attempt, priority, ttl, timeout, cache_failures, partition
                ),
                kind,
                self.shown_key(key),
            )
        return await self._run_flight(
            kind, key, make_attempt, priority, ttl, timeout, cache_failures, partition
        )

    def shown_key(self, key: str | bytes) -> str:
        """``key`` as readable keys, logs, the status page and stored records show it:
        secret query parameters and URL passwords redacted."""
        return codec.redact_secrets(codec.readable_key(key), self.config.secret_params)

    async def _run_flight(
        self,
        kind: str,
        key: str | bytes,
        make_attempt: Callable[[str], Attempt],
        priority: int,
        ttl: float | None,
        timeout: float | None,
        cache_failures: bool,
        partition: str,
    ) -> tuple[Result, BaseException | None]:
        validate_call(priority, ttl, timeout)
        started = time.perf_counter()
        text = self.shown_key(key)
        await self._ensure()
        slot = (kind, codec.key_digest(kind, key, partition))
        lf = self._local.get(slot)
        if lf is not None and lf.future.done():
            lf = None  # finished; its driver has not cleaned up yet. Ask Redis afresh.
        first = lf is None
        if lf is None:
            ttl_ms = -1 if ttl is None else int(ttl * 1000)
            attempt = make_attempt(text)
            lf = LocalFlight(kind, text, slot[1], attempt, priority, ttl_ms, cache_failures)
            self._local[slot] = lf
            self.worker.spawn(self._drive(lf), "dedupcall-flight")
        elif lf.abandoned:
            lf.revive()
        lf.waiters += 1
        lf.unbounded += timeout is None
        try:
            result = await within(asyncio.shield(lf.future), timeout)
        except TimeoutError:
            self.count("timeouts")
            if lf.outage_since is not None:  # it is Redis that kept the answer away
                raise RedisUnavailable(
                    f"Redis unreachable for the last {time.monotonic() - lf.outage_since:.1f}"
                    f" s: no result for {text!r} within {timeout} s"
                ) from None
            raise WaitTimeout(
                f"no result for {text!r} within {timeout} s", request_id=lf.request_id
            ) from None
        except DedupError:
            self.count("failed")  # no result at all (the Dedup closed, Redis lost it)
            raise
        finally:
            lf.waiters -= 1
            lf.unbounded -= timeout is None
            if lf.waiters == 0 and not lf.future.done():
                lf.abandon()
        outcome = lf.outcome if first else ("cached" if lf.outcome == "cached" else "joined")
        self.metrics.call_done(outcome, time.perf_counter() - started, failed=not result.success)
        result = dataclasses.replace(result, outcome=outcome)
        # Every caller in the process that ran it shares the original exception.
        return result, lf.local_error

    async def _drive(self, lf: LocalFlight) -> None:
        """Take part in the Redis flight for ``lf`` until it resolves or every caller left."""
        evicted = False
        try:
            while True:
                # Known locally before Redis knows it: a grant for it may arrive (a sweep's
                # listing) before the submit reply is processed.
                proposed = uuid.uuid4().hex
                self._track(lf, proposed)
                reply = await self._submit(lf, proposed)
                verdict, rid = reply[0].decode(), reply[1].decode()
                if rid != proposed:
                    self._untrack(lf, proposed)
                    self._track(lf, rid)
                self._log_submit(verdict, rid, proposed, lf.key)
                if verdict == "cached":
                    result = self._decode_result(reply[2], cached=True)
                    if result.error_type == "MalformedResult" and not evicted:
                        # A stored answer that cannot be read answers nobody: evict it.
                        evicted = True
                        await self.store.evict(lf.digest)
                        self._untrack(lf, rid)
                        continue
                    lf.resolve(result)
                    return
                if verdict == "granted":
                    grant = Grant.from_reply([rid, *reply[2:5], lf.kind, lf.digest])
                    if self.worker.accept(grant):  # run it in this task: no hop
                        lf.executing = True
                        await self._execute_local(lf, grant)
                elif verdict == "queued":
                    self.worker.on_grants(reply[2])  # what a free slot let run, ours too
                state = await self._wait_done(lf, rid)
                if state == "resolved":
                    return
                if state == "abandoned":
                    with contextlib.suppress(RedisUnavailable):
                        await self.store.leave(rid)
                    if lf.waiters == 0:
                        return
                    lf.revive()  # a caller arrived meanwhile: take part again
                # "vanished": gone without a result (Redis lost data). Its executor, if
                # alive, re-establishes it: wait for that, then submit again (joining it,
                # or as a new flight); this id is forgotten.
                self._untrack(lf, rid)
                with contextlib.suppress(RedisUnavailable):
                    await self.store.until_recovered()
        except Exception as exc:
            lf.fail(exc if isinstance(exc, DedupError) else RedisUnavailable(str(exc)))
        finally:
            # Cancelled (a shutdown) or ended without an answer: its callers must not hang.
            lf.fail(DedupError(f"the flight for {lf.key!r} was stopped before it finished"))
            if self._local.get((lf.kind, lf.digest)) is lf:
                del self._local[(lf.kind, lf.digest)]
            for rid in list(lf.ids):
                self._untrack(lf, rid)

    def _track(self, lf: LocalFlight, rid: str) -> None:
        lf.request_id = rid
        lf.ids.add(rid)
        self._by_id[rid] = lf

    def _untrack(self, lf: LocalFlight, rid: str) -> None:
        lf.ids.discard(rid)
        if self._by_id.get(rid) is lf:
            del self._by_id[rid]

    def _log_submit(
        self, verdict: str, rid: str, proposed: str, key: str, *, each_call: bool = False
    ) -> None:
        event = (
            events.CACHED
            if verdict == "cached"
            else events.QUEUED
            if rid == proposed
            else events.JOINED
        )
        # A flight's local callers share one submit, so a join logs once per process; a
        # queued request submits per call, so its joins are per call: DEBUG, like hits.
        level = logging.DEBUG if each_call and event == events.JOINED else None
        events.flight_event(event, self.instance_id, request_id=rid, key=key, level=level)

    async def _wait_done(self, lf: LocalFlight, rid: str) -> str:
        """Wait for ``rid`` to finish: resolved, abandoned (every caller left) or vanished."""
        poll = self.config.poll_interval
        while not lf.future.done():
            if lf.execution is not None and not lf.execution.done():
                # Our own attempt runs: its outcome (with the original exception) comes
                # from it, not from the push it is about to cause.
                await asyncio.wait({lf.future, lf.execution}, return_when=asyncio.FIRST_COMPLETED)
                continue
            if lf.abandoned and not lf.executing:
                return "abandoned"
            watch = self._notifier.watch(rid)
            wake: set[asyncio.Future[Any]] = {watch, lf.future}
            if not lf.executing:
                wake.add(lf.left)
            try:
                await asyncio.wait(wake, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._notifier.unwatch(rid, watch)
            if lf.future.done() or (lf.left.done() and not lf.executing and not watch.done()):
                continue
            if lf.execution is not None and not lf.execution.done():
                continue  # granted to us meanwhile: wait for our own attempt (loop top)
            pushed = watch.result() if watch.done() else None
            if pushed:  # the result rode in the push: no round trip
                if _moved(result := self._decode_result(pushed)):
                    return "vanished"  # merged into a run Redis had lost: join it
                lf.resolve(result)
                continue
            try:
                raw, exists = await self.store.read_result(rid, check_flight=pushed is None)
            except RedisUnavailable:
                # Ride out an outage (a restart, a failover) while a caller still waits:
                # each one's own timeout ends its wait (as RedisUnavailable). Callers
                # without a timeout bound it: past a lease, they are answered with it.
                outage = lf.outage_since = lf.outage_since or time.monotonic()
                limit = max(self.config.lock_timeout, 2 * self.config.socket_timeout)
                if lf.unbounded and time.monotonic() - outage > limit:
                    raise
                poll = min(0.5, self.config.poll_interval)
                continue
            lf.outage_since, poll = None, self.config.poll_interval
            if raw is not None:
                if _moved(result := self._decode_result(raw)):
                    return "vanished"
                lf.resolve(result)
            elif not exists and not lf.executing:
                return "vanished"
        return "resolved"

    def _run_local_grant(self, grant: Grant) -> bool:
        """Take a grant for a function/transport flight held here: run it, let our attempt
        in progress adopt it, or run it right after that attempt's completion (which the
        new grant makes stale). False when no caller here holds the flight."""
        lf = self._by_id.get(grant.request_id)
        if lf is None:
            # Joined a flight whose id the submit reply has not told us yet.
            lf = self._local.get((grant.kind, grant.digest))
        if lf is None or lf.abandoned or lf.future.done():
            return False
        if lf.executing:
            if not self.worker.adopt(grant):
                lf.next_grant = grant
            return True
        lf.executing = True
        lf.execution = self.worker.spawn(
            self._execute_local(lf, grant), f"dedupcall-exec-{grant.request_id}"
        )
        return True

    async def _execute_local(self, lf: LocalFlight, grant: Grant | None) -> None:
        while grant is not None:
            try:
                finished = await self.worker.execute(grant, lf.attempt)
            finally:
                lf.executing = False
            if finished.result is not None:
                lf.resolve(finished.result, executed_here=not finished.lost, error=finished.error)
            elif finished.error is not None:
                lf.fail(finished.error)
            grant, lf.next_grant = lf.next_grant, None
            if grant is not None and lf.future.done():
                self.worker.spawn(self.worker.release(grant, drop=False), "dedupcall-release")
                self.worker.forget(grant)
                grant = None
            lf.executing = grant is not None

    # --- queued HTTP requests ------------------------------------------------------
    async def add_get_request(
        self,
        api_path: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        **options: Any,
    ) -> str:
        """Queue a GET of ``url``, deduplicated by ``api_path``; returns the request id."""
        return await self.add_request("GET", api_path, url, None, headers, priority, **options)

    async def add_post_request(
        self,
        api_path: str,
        url: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        **options: Any,
    ) -> str:
        """Queue a POST; ``body`` is sent as JSON (dict, list, ...) or as-is (str, bytes)."""
        return await self.add_request("POST", api_path, url, body, headers, priority, **options)

    async def add_put_request(
        self,
        api_path: str,
        url: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        **options: Any,
    ) -> str:
        """Queue a PUT; see ``add_post_request``."""
        return await self.add_request("PUT", api_path, url, body, headers, priority, **options)

    async def add_delete_request(
        self,
        api_path: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        **options: Any,
    ) -> str:
        """Queue a DELETE of ``url``."""
        return await self.add_request("DELETE", api_path, url, None, headers, priority, **options)

    async def add_request(
        self,
        method: str,
        api_path: str,
        url: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        *,
        on_conflict: str = "raise",
        ttl: float | None = None,
        cache_failures: bool = False,
    ) -> str:
        """Queue an HTTP request that any worker may run; returns its (or the joined) id.

        A duplicate ``api_path`` joins the flight in progress (raising its priority if
        higher) or gets the cached success. A *different* request on the same path raises
        ``ConflictError`` unless ``on_conflict="join"``.
        """
        validate_priority(priority)
        if on_conflict not in ("raise", "join"):
            raise ConfigError(f"on_conflict must be 'raise' or 'join', got {on_conflict!r}")
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            shown = self.shown_key(url) if isinstance(url, (str, bytes)) else url
            raise ConfigError(f"url must be an http(s) URL, got {shown!r}")
        validate({"result_ttl": ttl} if ttl is not None else {})
        hdrs = {str(k): str(v) for k, v in (headers or {}).items()}
        encoded = codec.encode_body(body)
        text = self.shown_key(api_path)
        await self._ensure()
        lf = LocalFlight(
            "request",
            text,
            codec.key_digest("request", api_path),
            self.worker.http_attempt,
            priority,
            -1 if ttl is None else int(ttl * 1000),
            cache_failures,
            payload=codec.encode_request(method, url, hdrs, encoded),
            fingerprint=codec.request_fingerprint(method, url, encoded),
            on_conflict=on_conflict,
            credentials=codec.credential_digest(
                hdrs.items(), self.config.credential_headers, self.config.key_secret
            ),
            fresh=httpcache.refuses_stored(hdrs.items()),
        )
        for evicted in (False, True):
            proposed = uuid.uuid4().hex
            reply = await self._submit(lf, proposed)
            verdict, rid = reply[0].decode(), str(reply[1].decode())
            if verdict != "cached" or evicted:
                break
            cached = self._decode_result(reply[2])
            if cached.error_type != "MalformedResult":
                if (
                    not httpcache.allowed(
                        cached.share,
                        hdrs.items(),
                        credential_headers=self.config.credential_headers,
                        secret=self.config.key_secret,
                    )
                    and on_conflict != "join"
                ):
                    raise ConflictError(
                        f"the cached answer for {text!r} (request {rid}) varies on headers "
                        "this request sends differently; pass on_conflict='join' to take it",
                        request_id=rid,
                        api_path=text,
                    )
                break
            await self.store.evict(lf.digest)  # a stored answer that cannot be read
        if verdict == "conflict":
            if reply[2] == b"credentials":
                why = (
                    "a request with other credentials is in flight or cached for "
                    f"{text!r} (request {rid}); its answer is never shared across "
                    "credentials: put the tenant in api_path"
                )
            else:
                why = (
                    f"a different request is already in flight or cached for {text!r} "
                    f"(request {rid}); pass on_conflict='join' to join it anyway"
                )
            raise ConflictError(why, request_id=rid, api_path=text)
        # Counted apart from calls: a queued request's caller waits (if at all) through
        # wait_for_result, so it has no outcome or wait of its own here.
        if verdict == "cached":
            self.count("queued_cached")
        else:  # a grant of an existing flight (ours, running) is a join too
            self.count("queued" if rid == proposed else "queued_joined")
        self._log_submit(verdict, rid, proposed, text, each_call=True)
        if verdict == "granted":
            self.worker.on_grant(Grant.from_reply([rid, *reply[2:5], "request", lf.digest]))
        elif verdict == "queued":
            self.worker.on_grants(reply[2])
        return rid

    async def wait_for_result(self, request_id: str, timeout: float | None = 30.0) -> Result:
        """Wait for the result of ``request_id`` (any kind of flight).

        Raises ``UnknownRequest`` for an id with neither flight nor result, ``WaitTimeout``
        after ``timeout`` seconds (``None``: until the flight ends, which is bounded).
        """
        validate({"timeout": timeout} if timeout is not None else {})
        await self._ensure()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        first = True
        probed = recovered = False
        outage: float | None = None  # since when Redis has been unreachable
        while True:
            watch = self._notifier.watch(request_id)
            try:
                pushed = watch.result() if watch.done() else None
                raw = pushed  # it just finished and the result rode in the push
                exists = True
                if not raw:
                    try:
                        raw, exists = await self.store.read_result(
                            request_id, check_flight=first or pushed is None
                        )
                    except RedisUnavailable:
                        # Ride out an outage (a restart, a failover) until the timeout;
                        # without one, for a lease.
                        outage = outage or time.monotonic()
                        limit = max(self.config.lock_timeout, 2 * self.config.socket_timeout)
                        if (deadline is None and time.monotonic() - outage > limit) or (
                            deadline is not None and loop.time() >= deadline
                        ):
                            raise
                        await asyncio.sleep(min(0.5, self.config.poll_interval))
                        continue
                    outage = None
                if raw is not None:
                    result = self._decode_result(raw, cached=first)
                    target = _moved(result)
                    if target is None:
                        return result
                    # Merged into a run Redis had lost and its executor re-established.
                    request_id, first = target, False
                    continue
                if not exists:
                    if first and not probed:
                        # Unknown, or forgotten by a Redis that lost its data (then its
                        # executor is re-establishing it): look again after that.
                        probed = True
                        left = None if deadline is None else max(0.0, deadline - loop.time())
                        if await self.store.until_recovered(start=False, limit=left):
                            continue
                    if first:
                        raise UnknownRequest(request_id)
                    if not recovered:
                        # Redis lost data: a live executor re-establishes what it runs.
                        recovered = True
                        left = None if deadline is None else max(0.0, deadline - loop.time())
                        await self.store.until_recovered(limit=left)
                        continue
                    raise CallFailed(
                        "the flight disappeared without a result (Redis lost its data) "
                        "and no executor re-established it",
                        error_type="FlightLost",
                        request_id=request_id,
                    )
                first = False
                wait = self.config.poll_interval
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        self.count("timeouts")
                        raise WaitTimeout(
                            f"no result for request {request_id} within {timeout} s",
                            request_id=request_id,
                        )
                    wait = min(wait, remaining)
                await asyncio.wait({watch}, timeout=wait)
            finally:
                self._notifier.unwatch(request_id, watch)

    # --- inspection and control ----------------------------------------------------
    async def get_flight(self, request_id: str) -> QueueItem | None:
        """The flight ``request_id`` if it is queued, delayed or running; else None."""
        await self._ensure()
        found = await status.items(self.store, [request_id])
        return found[0] if found else None

    async def get_flight_by_key(
        self, key: str | bytes, kind: str | None = None
    ) -> QueueItem | None:
        """The unfinished flight for ``key`` (``kind``: request, function or transport;
        default: any), looked up without enqueuing anything."""
        await self._ensure()
        ids = await status.active_ids(self.store, key, [kind] if kind else list(codec.KINDS))
        found = await status.items(self.store, ids)
        return found[0] if found else None

    async def get_queue_items(self, limit: int | None = None) -> list[QueueItem]:
        """Every unfinished flight (at most ``limit`` of each state): running first, then
        queued by urgency, then delayed."""
        await self._ensure()
        return await status.all_items(self.store, limit)

    async def get_queue_status(self) -> QueueStatus:
        """Queue length, running and delayed counts, live instances and the shared config."""
        await self._ensure()
        found, bad = await status.queue_status(self.store, self.config.shared())
        if bad:
            # Redis lost (or holds a malformed) shared config: restore it first, so what
            # is reported is what the scripts enforce.
            await self.store.repair()
            found, bad = await status.queue_status(self.store, self.config.shared())
        return found

    async def clear_queue(self) -> int:
        """Remove every queued and delayed flight (not running ones); their waiters get
        ``QueueCleared``. Returns how many were removed."""
        await self._ensure()
        total = 0
        while n := await self.store.clear_batch(500):
            total += n
        return total

    async def update_config(self, **values: Any) -> None:
        """Change shared config for every instance (they follow within a second).

        Only ``max_concurrent``, ``max_retries``, ``retry_delay``, ``lock_timeout``,
        ``result_ttl`` and ``retention`` are shared; invalid values raise ``ConfigError``
        and change nothing.
        """
        check_shared(values)
        await self._ensure()
        await self.store.write_shared_config(encode_shared(values))
        self._apply_shared(values)

    def count(self, event: str) -> None:
        """Count one ``event`` in ``stats()``, from any thread (``bypassed``: sent straight
        to the upstream because Redis was unavailable; ``passed_through``: a request the
        transport does not deduplicate; ``timeouts``: a caller's wait ran out)."""
        self.metrics.count(event)

    def stats(self) -> dict[str, Any]:
        """This instance's numbers, as written beside its heartbeat.

        Counters: calls ``executed``, ``joined``, ``cached`` (by how each caller got its
        result) and ``failed``; queued requests (``add_*_request``) that opened a flight
        (``queued``), joined one (``queued_joined``) or were answered from the cache
        (``queued_cached``); ``executions``, ``retries``,
        ``failures`` and ``lease_lost`` of its worker; ``timeouts`` of its waiters;
        ``reconnects`` of its subscriber connection; ``bypassed`` and ``passed_through``
        of the entry points. Histograms (``{"count", "sum", "counts"}`` over
        ``dedupcall.metrics.BUCKETS``): ``wait_seconds`` by outcome, how long callers
        waited for their result; ``execution_seconds``, how long attempts ran here.
        """
        out = self.metrics.snapshot()
        notifier = getattr(self, "_notifier", None)
        if notifier is not None:
            out["reconnects"] = notifier.reconnects
        return out
