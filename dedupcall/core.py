"""Dedup: the async core. Submit, wait, complete; status, items, clear and shared config.

One ``Dedup`` is one instance: its own id, heartbeat, subscriber connection and worker.
It binds to the event loop it is first used on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from dedupcall import codec
from dedupcall.aio import within
from dedupcall.config import (
    SHARED_FIELDS,
    Config,
    check_url,
    config_from_env,
    decode_shared,
    encode_shared,
    redact,
    url_from_env,
    validate,
    validate_priority,
)
from dedupcall.errors import (
    CallFailed,
    ConfigError,
    ConflictError,
    DedupError,
    RedisUnavailable,
    SerializationError,
    UnknownRequest,
    WaitTimeout,
)
from dedupcall.flights import LocalFlight
from dedupcall.keys import KeySpace
from dedupcall.models import Grant, InstanceInfo, QueueItem, QueueStatus, Result
from dedupcall.notifier import Notifier
from dedupcall.scripts import Scripts
from dedupcall.worker import Outcome, Worker

log = logging.getLogger("dedupcall")

METHODS_WITH_BODY = ("POST", "PUT", "PATCH")


@contextlib.contextmanager
def redis_errors() -> Any:
    """Map every client-side Redis failure to ``RedisUnavailable`` (chained)."""
    try:
        yield
    except RedisError as exc:
        raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc


class Dedup:
    """Routes calls for the same key, from any number of processes, into one execution.

    ``async with Dedup(url, namespace="app") as dedup:`` starts this instance's worker and
    drains it on exit; without ``async with``, the first use starts it and ``aclose()``
    stops it. Values given here seed the namespace's shared config in Redis only where it
    is not set yet; afterwards Redis wins and ``update_config`` changes it everywhere.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", namespace: str = "dedupcall", **config: Any) -> None:
        self.url = check_url(url)
        self.keys = KeySpace(namespace)
        self.namespace = namespace
        self.config = Config().with_values(**config)
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._counters: Counter[str] = Counter()
        self._local: dict[tuple[str, str], LocalFlight] = {}
        self._by_id: dict[str, LocalFlight] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Future[None] | None = None
        self._ready = False
        self._closed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Dedup:
        """Build from ``REDIS_URL`` (or ``REDIS_HOST/PORT/PASSWORD/DB``), ``DEDUPCALL_NAMESPACE``
        and ``DEDUPCALL_<SETTING>`` variables; keyword ``overrides`` win."""
        env = os.environ if environ is None else environ
        url = url_from_env(env)
        if url is None:
            raise ConfigError("no Redis configured: set REDIS_URL or REDIS_HOST (and REDIS_PORT, ...)")
        values = {**config_from_env(env), **overrides}
        namespace = values.pop("namespace", env.get("DEDUPCALL_NAMESPACE", "dedupcall"))
        return cls(url, namespace=namespace, **values)

    def __repr__(self) -> str:
        return f"Dedup(url={redact(self.url)!r}, namespace={self.namespace!r}, instance_id={self.instance_id!r})"

    # --- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> Dedup:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect, seed config, subscribe and start the worker (idempotent)."""
        if self._ready:
            self._check_loop()
            return
        if self._closed:
            raise DedupError("this Dedup is closed")
        if self._starting is None:
            self._loop = asyncio.get_running_loop()
            self._starting = self._loop.create_future()
            try:
                await self._start()
                self._ready = True
                self._starting.set_result(None)
            except BaseException as exc:
                self._starting.set_exception(exc)
                self._starting.exception()
                self._starting = None
                await self._close_clients()
                raise
        else:
            self._check_loop()
            await asyncio.shield(self._starting)

    def _check_loop(self) -> None:
        if self._loop is not asyncio.get_running_loop():
            raise DedupError("this Dedup is bound to another event loop; create one per loop")

    def _pool(self, max_connections: int) -> aioredis.BlockingConnectionPool:
        cfg = self.config
        return aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=max_connections,
            timeout=cfg.socket_timeout,  # waiting for a free connection: typed error, not a hang
            socket_timeout=cfg.socket_timeout,
            socket_connect_timeout=cfg.socket_timeout,
            retry=Retry(NoBackoff(), 0),  # retried where it is safe, by us, not blindly
        )

    async def _start(self) -> None:
        self._redis = aioredis.Redis(connection_pool=self._pool(self.config.max_connections))
        # Lease renewal and sweeps on their own connections: never queued behind big transfers.
        self._control = aioredis.Redis(connection_pool=self._pool(2))
        self._subclient = aioredis.Redis(connection_pool=self._pool(2))
        self._scripts = Scripts(self._redis)
        self.worker = Worker(self)
        self._notifier = Notifier(
            self._subclient, self.keys, self.instance_id,
            on_grant=self.worker.on_grant,
            on_control=self._on_control,
            on_resubscribe=self._on_resubscribe,
        )
        shared = encode_shared(self.config.shared())
        args: list[Any] = [self._hb_ms(), self.worker.info()]
        for name, value in shared.items():
            args += [name, value]
        with redis_errors():
            await self._scripts.load(self._redis)
            reply = await self._run("init", [self.keys.config, self.keys.instances,
                                             self.keys.instance_info(self.instance_id)], args)
        self._apply_shared(decode_shared(_pairs(reply)))
        self._notifier.start()
        try:
            await within(self._notifier.connected_once.wait(), self.config.socket_timeout * 2)
        except TimeoutError:
            await self._notifier.stop()
            raise RedisUnavailable("could not subscribe to notifications in time") from None
        self.worker.start()

    async def aclose(self) -> None:
        """Stop taking grants, let running attempts finish (``drain_timeout``), hand the rest
        back, leave every flight, and close connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._starting)  # a start in progress finishes first
        if not self._ready:
            await self._close_clients()
            return
        self.worker.draining = True
        await self.worker.stop_sweeping()
        with contextlib.suppress(DedupError):
            await self._retire()
        await self.worker.drain(self.config.drain_timeout)
        closed = DedupError("this Dedup was closed while the call was waiting")
        for lf in list(self._local.values()):
            lf.fail(closed)
        await self.worker.stop()
        await self._notifier.stop()
        await self._close_clients()
        self._ready = False

    async def _close_clients(self) -> None:
        for name in ("_redis", "_control", "_subclient"):
            client = getattr(self, name, None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
                    await client.connection_pool.disconnect()

    async def _ensure(self) -> None:
        if not self._ready:
            await self.start()
        elif self._loop is not asyncio.get_running_loop():
            self._check_loop()

    # --- Redis plumbing ----------------------------------------------------------
    def _hb_ms(self) -> int:
        return int(max(3 * self.config.heartbeat_interval, 1.0) * 1000)

    def _common(self) -> list[Any]:
        return [self.keys.prefix, self.instance_id, int(self.config.retention * 1000)]

    async def _run(self, name: str, keys: list[str], args: list[Any], *, control: bool = False) -> Any:
        client = self._control if control else None
        with redis_errors():
            return await self._scripts.run(name, keys, self._common() + args, client=client)

    def _apply_shared(self, values: dict[str, Any]) -> None:
        changed = {k: v for k, v in values.items() if getattr(self.config, k) != v}
        if changed:
            self.config = self.config.with_values(**changed)

    def _on_control(self, message: str) -> None:
        if message == "config" and self._ready:
            self.worker.spawn(self._reload_config(), "dedupcall-config")

    async def _reload_config(self) -> None:
        with contextlib.suppress(RedisUnavailable), redis_errors():
            self._apply_shared(decode_shared(await self._redis.hgetall(self.keys.config)))

    async def _on_resubscribe(self) -> None:
        # Anything finished or granted while we were unsubscribed: look again.
        for rid in self._notifier.watched():
            self._notifier.mark_done(rid)
        if self._ready:
            self.worker.wake_sweep(mine=True)

    def _decode_result(self, raw: bytes | str, *, cached: bool = False) -> Result:
        try:
            return Result.from_record(codec.decode_record(raw), cached=cached)
        except (ValueError, KeyError, TypeError) as exc:
            return Result(False, None, f"stored result is malformed: {exc}", "", "", 0,
                          error_type="MalformedResult", cached=cached)

    # --- scripts the worker calls ----------------------------------------------------
    async def _submit(self, lf: LocalFlight, rid: str) -> list[Any]:
        k = self.keys
        keys = [k.cache(lf.digest), k.active(lf.digest), k.flight(rid), k.holders(rid),
                k.held(self.instance_id), k.seq, k.queue, k.running, k.config]
        args = [lf.kind, lf.digest, lf.key, rid, lf.priority, lf.ttl_ms, int(lf.cache_failures),
                lf.fingerprint, lf.on_conflict,
                lf.payload, 0 if self.worker.draining else 1]
        return list(await self._run("submit", keys, args))

    async def _complete(self, grant: Grant, outcome: Outcome) -> list[Any]:
        k, rid = self.keys, grant.request_id
        return list(await self._run(
            "complete", [k.flight(rid), k.result(rid), k.queue, k.running, k.config],
            [rid, grant.token, outcome.record, int(outcome.ok), -1]))

    async def _retry(self, grant: Grant, outcome: Outcome) -> list[Any]:
        k, rid = self.keys, grant.request_id
        return list(await self._run(
            "retry", [k.flight(rid), k.result(rid), k.queue, k.delayed, k.running, k.config],
            [rid, grant.token, outcome.record, random.random(), outcome.retry_after_ms]))

    async def _release(self, grant: Grant, *, drop: bool) -> None:
        k, rid = self.keys, grant.request_id
        with contextlib.suppress(RedisUnavailable):
            reply = await self._run(
                "release", [k.flight(rid), k.held(self.instance_id), k.queue, k.running, k.config],
                [rid, grant.token, int(drop)], control=True)
            if reply[0] == b"released" and not self.worker.draining:
                self.worker.on_grants(reply[1])

    async def _leave(self, request_id: str) -> None:
        k = self.keys
        await self._run("leave", [k.flight(request_id), k.holders(request_id),
                                  k.held(self.instance_id), k.queue, k.instances], [request_id])

    async def _renew(self, grants: list[Grant]) -> tuple[int, list[bytes]]:
        args: list[Any] = []
        for g in grants:
            args += [g.request_id, g.token]
        lease_ms, lost = await self._run("renew", [self.keys.running, self.keys.config], args, control=True)
        return int(lease_ms), list(lost)

    async def _reap(self, want_mine: bool) -> list[Any]:
        k = self.keys
        return list(await self._run(
            "reap", [k.queue, k.delayed, k.running, k.instances, k.config, k.instance_info(self.instance_id)],
            [self._hb_ms(), self.worker.info(), int(want_mine)], control=True))

    async def _retire(self) -> None:
        k = self.keys
        await self._run("retire", [k.instances, k.held(self.instance_id), k.instance_info(self.instance_id),
                                   k.queue, k.running], [], control=True)

    async def _flight_payload(self, request_id: str) -> tuple[str, bytes | None]:
        with redis_errors():
            key, payload = await self._redis.hmget(self.keys.flight(request_id), ["key", "payload"])
        return (key.decode("utf-8", "replace") if key else ""), payload

    # --- function flights ----------------------------------------------------------
    async def call(
        self,
        key: str | bytes,
        fn: Callable[[], Awaitable[Any] | Any],
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
        cache_failures: bool = False,
    ) -> Any:
        """Run ``fn`` once for ``key`` across every instance and return its value.

        Callers of the same key share one execution and its outcome; a success is served
        to later callers for ``ttl`` seconds (default ``result_ttl``). Raises ``CallFailed``
        (``__cause__`` is the original exception in the process that ran it), ``WaitTimeout``
        after ``timeout`` seconds, or ``RedisUnavailable``.
        """
        result, error = await self._call_flight("function", key, fn, priority=priority, ttl=ttl,
                                                timeout=timeout, retry_on=retry_on,
                                                cache_failures=cache_failures)
        if result.success:
            return result.data
        raise result.to_error() from error

    async def call_result(self, key: str | bytes, fn: Callable[[], Awaitable[Any] | Any], **options: Any) -> Result:
        """Like ``call`` but returns the ``Result`` (success or not) instead of raising ``CallFailed``."""
        result, _ = await self._call_flight("function", key, fn, **options)
        return result

    async def _call_flight(
        self,
        kind: str,
        key: str | bytes,
        fn: Callable[[], Awaitable[Any] | Any],
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
        cache_failures: bool = False,
    ) -> tuple[Result, BaseException | None]:
        validate_priority(priority)
        if ttl is not None:
            validate({"result_ttl": ttl})
        if timeout is not None:
            validate({"timeout": timeout})
        text = codec.readable_key(key)
        await self._ensure()
        slot = (kind, codec.key_digest(kind, key))
        lf = self._local.get(slot)
        if lf is not None and lf.future.done():
            lf = None  # finished; its driver has not cleaned up yet. Ask Redis afresh.
        first = lf is None
        if lf is None:
            lf = LocalFlight(kind, text, slot[1], self._function_attempt(text, fn, retry_on),
                             priority, -1 if ttl is None else int(ttl * 1000), cache_failures)
            self._local[slot] = lf
            lf.driver = self.worker.spawn(self._drive(lf), "dedupcall-flight")
        elif lf.abandoned:
            lf.revive()
        lf.waiters += 1
        try:
            result = await within(asyncio.shield(lf.future), timeout)
        except TimeoutError:
            self._counters["timeouts"] += 1
            raise WaitTimeout(f"no result for {text!r} within {timeout} s", request_id=lf.request_id) from None
        finally:
            lf.waiters -= 1
            if lf.waiters == 0 and not lf.future.done():
                lf.abandon()
        outcome = lf.outcome if first else ("cached" if lf.outcome == "cached" else "joined")
        self._counters[outcome] += 1
        if not result.success:
            self._counters["failed"] += 1
        return result, (lf.local_error if outcome == "executed" else None)

    def _function_attempt(
        self, key: str, fn: Callable[[], Awaitable[Any] | Any],
        retry_on: type[BaseException] | tuple[type[BaseException], ...],
    ) -> Callable[[Grant], Awaitable[Outcome]]:
        what = getattr(fn, "__qualname__", repr(fn))

        async def attempt(grant: Grant) -> Outcome:
            fields = {"request_id": grant.request_id, "key": key, "kind": "function",
                      "attempts": grant.attempts, "executed_by": self.instance_id}
            try:
                value = fn()
                if inspect.isawaitable(value):
                    value = await within(value, self.config.execution_timeout)
            except Exception as exc:
                etype = "ExecutionTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                record = codec.result_record(ok=False, error_type=etype, message=str(exc)[:2000], **fields)
                return Outcome(record, ok=False, retryable=isinstance(exc, retry_on), error=exc)
            try:
                record = codec.result_record(ok=True, data=value, **fields)
            except SerializationError as exc:
                message = f"{what} returned a value that is not JSON-serializable for key {key!r}: {exc}"
                record = codec.result_record(ok=False, error_type="SerializationError", message=message, **fields)
                return Outcome(record, ok=False, error=SerializationError(message))
            return Outcome(record, ok=True)

        return attempt

    async def _drive(self, lf: LocalFlight) -> None:
        """Take part in the Redis flight for ``lf`` until it resolves or every caller left."""
        try:
            while True:
                # Known locally before Redis knows it: a grant for it may arrive (a sweep's
                # listing) before the submit reply is processed.
                proposed = lf.request_id = uuid.uuid4().hex
                self._by_id[proposed] = lf
                reply = await self._submit(lf, proposed)
                verdict, rid = reply[0].decode(), reply[1].decode()
                if rid != proposed:
                    del self._by_id[proposed]
                    lf.request_id = rid
                if verdict == "cached":
                    lf.resolve(self._decode_result(reply[2], cached=True))
                    return
                self._by_id[rid] = lf
                if verdict == "granted":
                    grant = Grant(rid, reply[2].decode(), int(reply[3]), int(reply[4]), lf.kind)
                    self.worker.on_grant(grant)
                state = await self._wait_done(lf, rid)
                if state == "abandoned":
                    with contextlib.suppress(RedisUnavailable):
                        await self._leave(rid)
                    if lf.waiters == 0:
                        return
                    lf.revive()  # a caller arrived meanwhile: take part again
                elif state == "resolved":
                    return
                # "vanished": the flight is gone without a result (Redis lost it): submit again
        except Exception as exc:
            lf.fail(exc if isinstance(exc, DedupError) else RedisUnavailable(str(exc)))
        finally:
            slot = (lf.kind, lf.digest)
            if self._local.get(slot) is lf:
                del self._local[slot]
            if lf.request_id is not None and self._by_id.get(lf.request_id) is lf:
                del self._by_id[lf.request_id]

    async def _wait_done(self, lf: LocalFlight, rid: str) -> str:
        """Wait for ``rid`` to finish: resolved, abandoned (every caller left) or vanished."""
        poll = self.config.poll_interval
        outage: float | None = None  # since when Redis has been unreachable
        while not lf.future.done():
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
            try:
                raw, exists = await self._read_result(rid, check_flight=not watch.done())
            except RedisUnavailable:
                # Ride out a short outage (a restart, a failover); past one lease, give up.
                now = time.monotonic()
                outage = outage or now
                if now - outage > max(self.config.lock_timeout, 2 * self.config.socket_timeout):
                    raise
                poll = min(0.5, self.config.poll_interval)
                continue
            outage, poll = None, self.config.poll_interval
            if raw is not None:
                lf.resolve(self._decode_result(raw))
            elif not exists and not lf.executing:
                return "vanished"
        return "resolved"

    async def _read_result(self, rid: str, *, check_flight: bool) -> tuple[bytes | None, bool]:
        """The stored result of ``rid``, and whether its flight still exists. After a push
        the result is there: one GET. Otherwise (a safety poll) GET and EXISTS together."""
        with redis_errors():
            if not check_flight:
                raw = await self._redis.get(self.keys.result(rid))
                if raw is not None:
                    return raw, True
            raw, exists = await self._redis.pipeline(transaction=False).get(
                self.keys.result(rid)).exists(self.keys.flight(rid)).execute()
        return raw, bool(exists)

    def _run_local_grant(self, grant: Grant) -> bool:
        """Run a grant for a function/transport flight held here; False if none is."""
        lf = self._by_id.get(grant.request_id)
        if lf is None or lf.abandoned or lf.future.done():
            return False
        lf.executing = True
        self.worker.spawn(self._execute_local(lf, grant), f"dedupcall-exec-{grant.request_id}")
        return True

    async def _execute_local(self, lf: LocalFlight, grant: Grant) -> None:
        try:
            finished = await self.worker.execute(grant, lf.attempt)
        finally:
            lf.executing = False
        if finished.result is not None:
            lf.resolve(finished.result, executed_here=not finished.lost, error=finished.error)
        elif finished.error is not None:
            lf.fail(finished.error)

    # --- queued HTTP requests ------------------------------------------------------
    async def add_get_request(self, api_path: str, url: str, headers: Mapping[str, str] | None = None,
                              priority: int = 0, **options: Any) -> str:
        """Queue a GET of ``url`` deduplicated by ``api_path``; returns the request id to wait on."""
        return await self.add_request("GET", api_path, url, None, headers, priority, **options)

    async def add_post_request(self, api_path: str, url: str, body: Any = None,
                               headers: Mapping[str, str] | None = None, priority: int = 0,
                               **options: Any) -> str:
        """Queue a POST; ``body`` is sent as JSON (dict/list/...) or as-is (str/bytes)."""
        return await self.add_request("POST", api_path, url, body, headers, priority, **options)

    async def add_put_request(self, api_path: str, url: str, body: Any = None,
                              headers: Mapping[str, str] | None = None, priority: int = 0,
                              **options: Any) -> str:
        """Queue a PUT; see ``add_post_request``."""
        return await self.add_request("PUT", api_path, url, body, headers, priority, **options)

    async def add_delete_request(self, api_path: str, url: str, headers: Mapping[str, str] | None = None,
                                 priority: int = 0, **options: Any) -> str:
        """Queue a DELETE of ``url``."""
        return await self.add_request("DELETE", api_path, url, None, headers, priority, **options)

    async def add_request(
        self, method: str, api_path: str, url: str, body: Any = None,
        headers: Mapping[str, str] | None = None, priority: int = 0, *,
        on_conflict: str = "raise", ttl: float | None = None, cache_failures: bool = False,
    ) -> str:
        """Queue an HTTP request that any worker may run; returns its (or the joined) request id.

        A duplicate ``api_path`` joins the flight in progress (raising its priority if
        higher) or gets the cached success. A *different* request on the same path raises
        ``ConflictError`` unless ``on_conflict="join"``.
        """
        validate_priority(priority)
        if on_conflict not in ("raise", "join"):
            raise ConfigError(f"on_conflict must be 'raise' or 'join', got {on_conflict!r}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must be an http(s) URL, got {url!r}")
        if ttl is not None:
            validate({"result_ttl": ttl})
        hdrs = {str(k): str(v) for k, v in (headers or {}).items()}
        encoded = codec.encode_body(body)
        text = codec.readable_key(api_path)
        await self._ensure()
        lf = LocalFlight("request", text, codec.key_digest("request", api_path), self.worker.http_attempt,
                         priority, -1 if ttl is None else int(ttl * 1000), cache_failures,
                         payload=codec.encode_request(method, url, hdrs, encoded),
                         fingerprint=codec.request_fingerprint(method, url, hdrs, encoded),
                         on_conflict=on_conflict)
        reply = await self._submit(lf, uuid.uuid4().hex)
        verdict, rid = reply[0].decode(), reply[1].decode()
        if verdict == "conflict":
            raise ConflictError(
                f"a different request is already in flight for {text!r} (request {rid}); "
                "pass on_conflict='join' to join it anyway", request_id=rid, api_path=text)
        self._counters[{"cached": "cached", "joined": "joined"}.get(verdict, "queued")] += 1
        if verdict == "granted":
            self.worker.on_grant(Grant(rid, reply[2].decode(), int(reply[3]), int(reply[4]), "request"))
        return rid

    async def wait_for_result(self, request_id: str, timeout: float | None = 30.0) -> Result:
        """Wait for the result of ``request_id`` (any kind of flight).

        Raises ``UnknownRequest`` for an id with neither flight nor result, ``WaitTimeout``
        after ``timeout`` seconds (``None``: until the flight ends, which is bounded).
        """
        if timeout is not None:
            validate({"timeout": timeout})
        await self._ensure()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        first = True
        while True:
            watch = self._notifier.watch(request_id)
            try:
                raw, exists = await self._read_result(request_id, check_flight=first or not watch.done())
                if raw is not None:
                    return self._decode_result(raw, cached=first)
                if not exists:
                    if first:
                        raise UnknownRequest(request_id)
                    raise CallFailed("the flight disappeared without a result (was Redis restarted?)",
                                     error_type="FlightLost", request_id=request_id)
                first = False
                wait = self.config.poll_interval
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise WaitTimeout(f"no result for request {request_id} within {timeout} s",
                                          request_id=request_id)
                    wait = min(wait, remaining)
                await asyncio.wait({watch}, timeout=wait)
            finally:
                self._notifier.unwatch(request_id, watch)

    # --- inspection and control ----------------------------------------------------
    async def get_flight(self, request_id: str) -> QueueItem | None:
        """The flight ``request_id`` if it is queued, delayed or running; else None."""
        await self._ensure()
        items = await self._items([request_id])
        return items[0] if items else None

    async def get_flight_by_key(self, key: str | bytes, kind: str | None = None) -> QueueItem | None:
        """The unfinished flight for ``key`` (kind: request, function or transport; default: any)."""
        await self._ensure()
        kinds = [kind] if kind else list(codec.KINDS)
        with redis_errors():
            ids = await self._redis.mget([self.keys.active(codec.key_digest(k, key)) for k in kinds])
        for rid in ids:
            if rid:
                item = await self.get_flight(rid.decode())
                if item:
                    return item
        return None

    async def get_queue_items(self) -> list[QueueItem]:
        """Every unfinished flight: running first, then queued by urgency, then delayed."""
        await self._ensure()
        k = self.keys
        with redis_errors():
            running, queued, delayed = await self._redis.pipeline(transaction=False).zrange(
                k.running, 0, -1).zrange(k.queue, 0, -1).zrange(k.delayed, 0, -1).execute()
        return await self._items([x.decode() for x in [*running, *queued, *delayed]])

    async def _items(self, ids: list[str]) -> list[QueueItem]:
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False).time()
        for rid in ids:
            pipe.hmget(self.keys.flight(rid), ["key", "kind", "prio", "att", "state", "created", "exec"])
            pipe.scard(self.keys.holders(rid))
        with redis_errors():
            replies = await pipe.execute()
        now_ms = replies[0][0] * 1000 + replies[0][1] // 1000
        items = []
        for i, rid in enumerate(ids):
            fields, holders = replies[1 + 2 * i], replies[2 + 2 * i]
            key, kind, prio, att, state, created, executor = (
                f.decode("utf-8", "replace") if f is not None else None for f in fields)
            if state is None:
                continue
            with contextlib.suppress(TypeError, ValueError):
                items.append(QueueItem(
                    request_id=rid, key=key or "", kind=kind or "", priority=int(prio or 0),
                    attempts=int(att or 0), state=state, age=max(0.0, (now_ms - int(created or now_ms)) / 1000),
                    executor=executor, waiters=int(holders)))
        return items

    async def get_queue_status(self) -> QueueStatus:
        """Queue length, running and delayed counts, live instances and the shared config."""
        await self._ensure()
        k = self.keys
        with redis_errors():
            now, queued, running, delayed, members, cfg = await self._redis.pipeline(transaction=False).time(
            ).zcard(k.queue).zcard(k.running).zcard(k.delayed).zrange(
                k.instances, 0, -1, withscores=True).hgetall(k.config).execute()
            now_ms = now[0] * 1000 + now[1] // 1000
            live = [(m.decode(), score) for m, score in members if score > now_ms]
            infos = await self._redis.mget([k.instance_info(i) for i, _ in live]) if live else []
        instances = []
        for (iid, score), raw in zip(live, infos):
            info = _json_or_empty(raw)
            hb = info.get("hb_ms", self._hb_ms())
            instances.append(InstanceInfo(
                id=iid, host=str(info.get("host", "")), pid=int(info.get("pid", 0) or 0),
                last_seen=max(0.0, (now_ms - (score - hb)) / 1000), stats=info.get("stats", {})))
        config = {**self.config.shared(), **decode_shared(cfg)}
        return QueueStatus(queue_length=queued, processing=running > 0, running=running, delayed=delayed,
                           instance_id=self.instance_id, instances=instances, config=config)

    async def clear_queue(self) -> int:
        """Remove every queued and delayed flight (not running ones); their waiters get
        ``QueueCleared``. Returns how many were removed."""
        await self._ensure()
        k, total = self.keys, 0
        while True:
            n = int(await self._run("clear", [k.queue, k.delayed, k.running], [500]))
            total += n
            if n == 0:
                return total

    async def update_config(self, **values: Any) -> None:
        """Change shared config for every instance (they follow within a second).

        Only ``max_concurrent``, ``max_retries``, ``retry_delay``, ``lock_timeout`` and
        ``result_ttl`` are shared; invalid values raise ``ConfigError`` and change nothing.
        """
        unknown = set(values) - set(SHARED_FIELDS)
        if unknown:
            raise ConfigError(f"not shared config option(s): {', '.join(sorted(unknown))}; "
                              f"shared: {', '.join(SHARED_FIELDS)}")
        validate(values)
        await self._ensure()
        with redis_errors():
            await self._redis.pipeline(transaction=True).hset(
                self.keys.config, mapping=encode_shared(values)).publish(
                self.keys.control_channel, "config").execute()
        self._apply_shared(values)

    def stats(self) -> dict[str, int]:
        """Counters of this instance: executed, joined, cached calls; executions, retries,
        failures, lease losses, timeouts, queued requests."""
        out = {name: 0 for name in ("executed", "joined", "cached", "failed", "queued",
                                    "executions", "retries", "failures", "lease_lost", "timeouts")}
        out.update(self._counters)
        if self._ready or self._closed:
            with contextlib.suppress(AttributeError):
                out.update(self.worker.stats)
        return out


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))


def _json_or_empty(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
