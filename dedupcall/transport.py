"""httpx transports that send each request once per key across every instance:
``DedupTransport`` (sync) and ``AsyncDedupTransport`` (async).

Only the process that wins a flight sends the request, through its inner transport;
everyone else gets an ``httpx.Response`` rebuilt from the stored one. A thin layer over
``Dedup.run_flight``: the twins share every pure step (``_Options``) and differ only in
how they send and read. Per-request options travel in ``request.extensions["dedupcall"]``;
the outcome comes back in ``response.extensions["dedupcall"]``.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

import httpx

from dedupcall import codec, httpcache, httpexec
from dedupcall.aio import pinned, within
from dedupcall.bodies import Captured, TooLarge, read_async, read_sync
from dedupcall.config import validate_call
from dedupcall.core import Dedup
from dedupcall.entry import RedisErrorPolicy, checked, current_default, default_dedup
from dedupcall.errors import (
    ConfigError,
    RedisUnavailable,
    ResponseTooLarge,
    TransportCallFailed,
)
from dedupcall.models import Grant, Result
from dedupcall.worker import Attempt, Outcome

DEFAULT_METHODS = ("GET", "HEAD")
#: Methods that may be sent again after a failure that could have reached the server.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_BODY_BYTES = 10 * 1024 * 1024
#: Requests that ask for part of a resource or a revalidation pass through, as they do
#: through an HTTP cache: their answer (206, 304) is not the resource others asked for.
CONDITIONAL_HEADERS = frozenset(
    {"range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since"}
)
#: Request headers that change the response's encoding or language: with the default key,
#: requests that differ in them (or in credentials, or body) never share a flight.
NEGOTIATION_HEADERS = frozenset({"accept", "accept-encoding", "accept-language"})
DEFAULT_CACHE_STATUSES = frozenset(range(200, 300)) - {206}
REQUEST_OPTIONS = frozenset({"enabled", "key", "ttl", "priority", "timeout"})
#: How long an answer bound to its requester's credentials (``no-store``, ``private``,
#: ``Set-Cookie``, ...) stays in Redis: long enough for the flight's joiners to read it;
#: it never answers a later caller.
BOUND_KEEP_MS = 30_000
KeyFunc = Callable[[httpx.Request], "str | None"]


def default_key(request: httpx.Request) -> str:
    """Method, scheme, host, path and query, its items sorted by name (repeated names
    keep their order: ``?a=2&a=1`` and ``?a=1&a=2`` are different requests). The body and
    the credential and content-negotiation headers separate flights too, through a keyed
    digest that never shows in the readable key (see ``request_partition``)."""
    url = request.url
    text = f"{request.method} {url.scheme}://{url.netloc.decode('ascii')}{url.path}"
    if url.query:
        items = sorted(url.params.multi_items(), key=lambda item: item[0])
        text += "?" + urlencode(items)
    return text


def request_partition(
    request: httpx.Request, credential_headers: Collection[str], secret: str | None
) -> str:
    """What separates flights of one default key without showing in it: a keyed digest of
    the credential and content-negotiation headers and of the body ("" when none)."""
    headers = codec.credential_digest(
        request.headers.multi_items(), {*credential_headers, *NEGOTIATION_HEADERS}, secret
    )
    body = codec.keyed_digest(request.content, secret) if request.content else ""
    return f"{headers}:{body}" if headers or body else ""


class _Handoff:
    """Carries a too-large live response from the code that sent the request to the
    caller it belongs to; whichever side comes second closes it if the other is gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: httpx.Response | None = None
        self._taken = False

    def offer(self, response: httpx.Response) -> httpx.Response | None:
        """Hold ``response`` for the caller; returns what the sender must close (this
        one if the caller has gone, or one an earlier attempt offered)."""
        with self._lock:
            if self._taken:
                return response
            old, self._response = self._response, response
            return old

    def take(
        self, result: Result | None = None
    ) -> tuple[httpx.Response | None, httpx.Response | None]:
        """(the live response this caller returns, the one to close): it keeps it only
        when its flight ended as ``ResponseTooLarge``."""
        with self._lock:
            self._taken = True
            live, self._response = self._response, None
        if live is not None and result is not None and result.error_type == "ResponseTooLarge":
            return live, None
        return None, live


class _Options:
    """Options and pure steps the twins share: which requests to deduplicate and under
    what key, the attempt that classifies an answer, and the response a caller gets."""

    def __init__(
        self,
        dedup: Dedup | None,
        *,
        methods: Collection[str],
        key: KeyFunc | None,
        ttl: float | None,
        priority: int,
        cache_statuses: Collection[int] | None,
        timeout: float | None,
        max_body_bytes: int,
        on_redis_error: str,
        share_set_cookie: bool,
    ) -> None:
        checked(dedup)
        if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
            raise ConfigError(f"methods= must be a collection of method names, got {methods!r}")
        if key is not None and not callable(key):
            raise ConfigError(f"key= must be a callable Request -> str | None, got {key!r}")
        statuses = DEFAULT_CACHE_STATUSES if cache_statuses is None else cache_statuses
        if isinstance(statuses, (str, bytes)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in statuses
        ):
            raise ConfigError(f"cache_statuses= must be ints, got {cache_statuses!r}")
        if (
            isinstance(max_body_bytes, bool)
            or not isinstance(max_body_bytes, int)
            or (max_body_bytes < 0)
        ):
            raise ConfigError(f"max_body_bytes must be an int >= 0, got {max_body_bytes!r}")
        self.flight = self._flight_options({"ttl": ttl, "priority": priority, "timeout": timeout})
        self._dedup = dedup
        self.methods = frozenset(m.upper() for m in methods)
        self.key_func = key
        self.cache_statuses = frozenset(statuses)
        self.max_body_bytes = max_body_bytes
        self.policy = RedisErrorPolicy(on_redis_error)
        self.share_set_cookie = bool(share_set_cookie)

    @staticmethod
    def _flight_options(values: dict[str, Any]) -> dict[str, Any]:
        validate_call(values.get("priority", 0), values.get("ttl"), values.get("timeout"))
        return values

    def dedup(self) -> Dedup:
        return self._dedup or default_dedup()

    def wanted(self, request: httpx.Request) -> dict[str, Any] | None:
        """This request's options if it is to be deduplicated, else None (count it)."""
        options = request.extensions.get("dedupcall") or {}
        if not isinstance(options, dict) or not set(options) <= REQUEST_OPTIONS:
            raise ConfigError(
                f"request.extensions['dedupcall'] must be a dict with keys among "
                f"{sorted(REQUEST_OPTIONS)}, got {options!r}"
            )
        enabled = options.get("enabled")
        if enabled is not True and (
            enabled is False
            or request.method not in self.methods
            or not CONDITIONAL_HEADERS.isdisjoint(request.headers.keys())
            or httpcache.refuses_stored(request.headers.multi_items())
        ):
            self._count_pass_through()
            return None
        return options

    def key(self, request: httpx.Request, options: dict[str, Any]) -> str | None:
        """The flight key (``request.content`` must be read); None: don't deduplicate."""
        key = options.get("key")
        if key is None:
            key = self.key_func(request) if self.key_func else default_key(request)
        if key is None:
            self._count_pass_through()
            return None
        if not isinstance(key, str):
            raise ConfigError(f"a transport key must be str or None, got {type(key).__name__}")
        return key

    def flight_for(
        self, dedup: Dedup, request: httpx.Request, options: dict[str, Any]
    ) -> dict[str, Any]:
        """The flight's options; with the default key, its credentials, negotiation
        headers and body keep it apart from other requests to the same URL."""
        given = {k: v for k, v in options.items() if k in ("ttl", "priority", "timeout")}
        flight = {**self.flight, **self._flight_options(given)} if given else self.flight
        if options.get("key") is None and self.key_func is None:
            config = dedup.config
            partition = request_partition(request, config.credential_headers, config.key_secret)
            if partition:
                flight = {**flight, "partition": partition}
        return flight

    def mine(self, dedup: Dedup, request: httpx.Request, result: Result) -> bool:
        """Whether this caller may take an answer it did not fetch itself: one bound to
        other credentials, or varying on headers this request sends differently, is not
        its to take (it sends its own request instead)."""
        if result.outcome == "executed" or result.share is None:
            return True
        config = dedup.config
        if httpcache.allowed(
            result.share,
            request.headers.multi_items(),
            credential_headers=config.credential_headers,
            secret=config.key_secret,
        ):
            return True
        dedup.count("unshared")
        return False

    def _count_pass_through(self) -> None:
        # Into our Dedup or an existing default: none is built just to count in it.
        dedup = self._dedup or current_default()
        if dedup is not None:
            dedup.count("passed_through")

    # --- the attempt ---------------------------------------------------------------
    def attempt(
        self,
        dedup: Dedup,
        send: Callable[[], Awaitable[Captured]],
        request: httpx.Request,
        ttl: float | None,
    ) -> Callable[[str], Attempt]:
        """The attempt factory of a transport flight: ``send()`` the request once
        (bounded by ``execution_timeout``) and classify what came back. A method that is
        not idempotent is sent again only when it surely never left (a failed connect)."""
        idempotent = request.method in IDEMPOTENT

        def make(key: str) -> Attempt:
            async def attempt(grant: Grant) -> Outcome:
                fields = {
                    "request_id": grant.request_id,
                    "key": key,
                    "kind": "transport",
                    "attempts": grant.attempts,
                    "executed_by": dedup.instance_id,
                }
                timeout = dedup.config.execution_timeout
                try:
                    answer = await within(send(), timeout)
                except TimeoutError as exc:
                    message = f"no response within execution_timeout={timeout} s"
                    return _failure(fields, "ExecutionTimeout", message, exc, idempotent)
                except TooLarge as exc:
                    message = (
                        f"{exc}; the caller that sent it received it, others must retry "
                        "without dedup (extensions={'dedupcall': {'enabled': False}})"
                    )
                    return _failure(fields, "ResponseTooLarge", message, exc)
                except httpx.TransportError as exc:
                    unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                    retry = idempotent or unsent
                    return _failure(fields, type(exc).__name__, str(exc), exc, retry)
                except Exception as exc:
                    return _failure(fields, type(exc).__name__, str(exc), exc)
                ttl_ms = int((dedup.config.result_ttl if ttl is None else ttl) * 1000)
                sharing = self._sharing(dedup, request, answer, ttl_ms)
                return self._classify(fields, answer, idempotent, sharing)

            return attempt

        return make

    def _sharing(
        self, dedup: Dedup, request: httpx.Request, answer: Captured, ttl_ms: int
    ) -> httpcache.Sharing:
        latin = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers]
        return httpcache.decide(
            request.method,
            str(request.url),
            request.headers.multi_items(),
            answer.status,
            latin,
            ttl_ms,
            credential_headers=dedup.config.credential_headers,
            secret=dedup.config.key_secret,
            share_set_cookie=self.share_set_cookie,
        )

    def _classify(
        self,
        fields: dict[str, Any],
        answer: Captured,
        idempotent: bool,
        sharing: httpcache.Sharing,
    ) -> Outcome:
        data = codec.encode_response(
            answer.status, answer.headers, answer.body, answer.http_version, answer.reason
        )
        status = answer.status
        share = sharing.record()
        keep = BOUND_KEEP_MS if sharing.bound else -1
        if status in self.cache_statuses:
            record = codec.result_record(
                ok=True, data=data, status_code=status, share=share, **fields
            )
            return Outcome(record, ok=True, cache_ms=sharing.cache_ms, keep_ms=keep)
        retryable = idempotent and status in httpexec.RETRY_STATUSES
        record = codec.result_record(
            ok=False,
            data=data,
            status_code=status,
            error_type="HTTPStatusError",
            message=f"HTTP {status} for {fields['key']}",
            share=share,
            **fields,
        )
        wait = httpexec.retry_after_ms(_header(answer.headers, b"retry-after"))
        return Outcome(
            record, ok=False, retryable=retryable, retry_after_ms=wait, cache_ms=0, keep_ms=keep
        )

    # --- the answer ------------------------------------------------------------------
    @staticmethod
    def response(
        request: httpx.Request,
        result: Result,
        error: BaseException | None,
        live: httpx.Response | None,
    ) -> httpx.Response:
        """The response this caller gets, or the ``TransportCallFailed`` it raises."""
        info = {"outcome": result.outcome, "request_id": result.request_id}
        if live is not None:
            live.extensions["dedupcall"] = info
            return live
        if isinstance(result.data, dict):
            try:
                status, headers, body, version, reason = codec.decode_response(result.data)
            except ValueError as exc:
                raise _failed(request, result, f"{exc}", "MalformedResult") from None
            return httpx.Response(
                status,
                headers=headers,
                stream=httpx.ByteStream(body),
                request=request,
                extensions={"http_version": version, "reason_phrase": reason, "dedupcall": info},
            )
        raise _failed(request, result, result.error or "", result.error_type) from error


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _failure(
    fields: dict[str, Any],
    error_type: str,
    message: str,
    error: BaseException,
    retryable: bool = False,
) -> Outcome:
    record = codec.result_record(ok=False, error_type=error_type, message=message[:2000], **fields)
    return Outcome(record, ok=False, retryable=retryable, error=error)


def _failed(
    request: httpx.Request, result: Result, message: str, error_type: str | None
) -> TransportCallFailed:
    cls = ResponseTooLarge if error_type == "ResponseTooLarge" else TransportCallFailed
    exc = cls(
        message,
        error_type=error_type or "Error",
        attempts=result.attempts,
        request_id=result.request_id,
        key=result.api_path,
        status_code=result.status_code,
    )
    exc.request = request
    return exc


_OPTIONS_DOC = """
    ``dedup``: the ``Dedup`` (default: ``dedupcall.configure``'s, else from the
    environment). ``transport``: the inner transport that really sends (default: httpx's
    own). ``methods``: what is deduplicated (default GET and HEAD; others pass straight
    through). ``key``: ``Request -> str | None`` (None: don't deduplicate this one;
    default ``default_key``). ``ttl``, ``priority``, ``timeout``: as for ``Dedup.call``.
    ``cache_statuses``: statuses whose response answers later callers (default 2xx but
    206). Requests with ``Range`` or conditional (``If-*``) headers pass through.
    ``max_body_bytes``: larger responses go only to the caller that sent the request;
    the others get ``ResponseTooLarge``. ``on_redis_error``: ``"raise"`` or ``"bypass"``.
    ``share_set_cookie``: let a response that sets a cookie answer other callers (by
    default it goes only to callers with the same credentials, and is never stored).
    A request may override ``enabled``, ``key``, ``ttl``, ``priority`` and ``timeout`` in
    ``extensions={"dedupcall": {...}}``.
"""


Inner = TypeVar("Inner", httpx.BaseTransport, httpx.AsyncBaseTransport)


class _Twin(Generic[Inner]):
    """What the twins share: their options and the inner transport they own."""

    _default_inner: Callable[[], Inner]

    def __init__(
        self,
        dedup: Dedup | None = None,
        transport: Inner | None = None,
        *,
        methods: Collection[str] = DEFAULT_METHODS,
        key: KeyFunc | None = None,
        ttl: float | None = None,
        priority: int = 0,
        cache_statuses: Collection[int] | None = None,
        timeout: float | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_redis_error: str = "raise",
        share_set_cookie: bool = False,
    ) -> None:
        self._options = _Options(
            dedup,
            methods=methods,
            key=key,
            ttl=ttl,
            priority=priority,
            cache_statuses=cache_statuses,
            timeout=timeout,
            max_body_bytes=max_body_bytes,
            on_redis_error=on_redis_error,
            share_set_cookie=share_set_cookie,
        )
        self._inner: Inner = transport if transport is not None else type(self)._default_inner()


class DedupTransport(_Twin[httpx.BaseTransport], httpx.BaseTransport):
    """A sync httpx transport: ``httpx.Client(transport=DedupTransport(dedup))``.

    The request is sent once per key across every instance, from the calling thread
    that won the flight; the others block only their own thread.
    """

    __doc__ = (__doc__ or "") + _OPTIONS_DOC
    _default_inner = httpx.HTTPTransport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        o = self._options
        options = o.wanted(request)
        if options is None:
            return self._inner.handle_request(request)
        request.read()
        key = o.key(request, options)
        if key is None or o.policy.skip(dedup := o.dedup()):
            return self._inner.handle_request(request)
        handoff = _Handoff()

        def send() -> Captured:  # in the calling thread that runs the flight
            try:
                return read_sync(request, self._inner.handle_request(request), o.max_body_bytes)
            except TooLarge as exc:
                _close_sync(handoff.offer(exc.response))
                raise

        def start(run_in_caller: Callable[[], Awaitable[Captured]]) -> Any:
            attempt = o.attempt(dedup, run_in_caller, request, flight["ttl"])
            # The bridge keeps this caller's timeout (see SyncBridge.call).
            return dedup.run_flight("transport", key, attempt, **{**flight, "timeout": None})

        flight = o.flight_for(dedup, request, options)
        try:
            result, error = dedup.sync.call("transport", key, send, start, flight["timeout"])
        except RedisUnavailable as exc:
            _close_sync(handoff.take()[1])
            o.policy.failed(dedup, exc, key)
            return self._inner.handle_request(request)
        except BaseException:
            _close_sync(handoff.take()[1])
            raise
        live, discard = handoff.take(result)
        _close_sync(discard)
        if not o.mine(dedup, request, result):
            return self._inner.handle_request(request)
        return o.response(request, result, error, live)

    def close(self) -> None:
        """Close the inner transport (the ``Dedup`` is not closed: it is not ours). Also
        what leaving ``with DedupTransport(...)`` does."""
        self._inner.close()


class AsyncDedupTransport(_Twin[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """An async httpx transport: ``httpx.AsyncClient(transport=AsyncDedupTransport(dedup))``.

    The request is sent once per key across every instance; the others await the result.
    """

    __doc__ = (__doc__ or "") + _OPTIONS_DOC
    _default_inner = httpx.AsyncHTTPTransport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        o = self._options
        options = o.wanted(request)
        if options is None:
            return await self._inner.handle_async_request(request)
        await request.aread()
        key = o.key(request, options)
        if key is None or o.policy.skip(dedup := o.dedup()):
            return await self._inner.handle_async_request(request)
        handoff = _Handoff()

        async def send() -> Captured:
            try:
                # Once sent, a request cannot be taken back: a drain waits for its answer
                # (execution_timeout still bounds it) rather than hand the flight on.
                with pinned():
                    response = await self._inner.handle_async_request(request)
                    return await read_async(request, response, o.max_body_bytes)
            except TooLarge as exc:
                await _close_async(handoff.offer(exc.response))
                raise

        flight = o.flight_for(dedup, request, options)
        attempt = o.attempt(dedup, send, request, flight["ttl"])
        try:
            result, error = await dedup.run_flight("transport", key, attempt, **flight)
        except RedisUnavailable as exc:
            await _close_async(handoff.take()[1])
            o.policy.failed(dedup, exc, key)
            return await self._inner.handle_async_request(request)
        except BaseException:
            await _close_async(handoff.take()[1])
            raise
        live, discard = handoff.take(result)
        await _close_async(discard)
        if not o.mine(dedup, request, result):
            return await self._inner.handle_async_request(request)
        return o.response(request, result, error, live)

    async def aclose(self) -> None:
        """Close the inner transport (the ``Dedup`` is not closed: it is not ours). Also
        what leaving ``async with AsyncDedupTransport(...)`` does."""
        await self._inner.aclose()


def _close_sync(response: httpx.Response | None) -> None:
    if response is not None:
        response.close()


async def _close_async(response: httpx.Response | None) -> None:
    if response is not None:
        await response.aclose()
