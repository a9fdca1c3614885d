"""Starlette/FastAPI integration: a lifespan that runs this instance's worker, and a
mountable status app. A plain Starlette lifespan: it installs no signal handlers (the
server owns them) and lets startup errors propagate. Starlette (and the Prometheus
client) are imported by ``status_app`` only: ``import dedupcall`` never loads them."""

from __future__ import annotations

import contextlib
import inspect
import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from dedupcall import report
from dedupcall.config import SHARED_FIELDS, parse_env_value, validate
from dedupcall.core import Dedup
from dedupcall.entry import checked, default_dedup
from dedupcall.errors import ConfigError, RedisUnavailable
from dedupcall.models import QueueItem, QueueStatus

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


def lifespan(
    dedup: Dedup | None = None,
    *,
    inner: Callable[[Any], Any] | None = None,
    state_key: str = "dedup",
    drain_timeout: float | None = None,
) -> Lifespan:
    """A lifespan that starts ``dedup``'s worker (claims, leases, heartbeats, reaper,
    queued requests) at startup and, at shutdown, stops taking flights, lets running ones
    finish for ``drain_timeout`` seconds (default: the config's), hands the rest back and
    closes connections.

    ``Starlette(lifespan=dedupcall.lifespan(dedup))``; ``inner=`` composes your own
    lifespan (an async context manager factory, or an async generator function), whose
    state is passed through. It starts after the worker; at shutdown the ``Dedup`` drains
    and closes first, so running flights can still use what your lifespan opened. The
    ``Dedup`` is in the lifespan state as ``request.state.dedup`` (``state_key``) and on
    ``app.state``. ``dedup`` defaults to the process-wide one (``dedupcall.configure``).
    """
    if drain_timeout is not None:
        validate({"drain_timeout": drain_timeout})
    if inner is not None and not callable(inner):
        raise ConfigError(f"inner= must be a lifespan callable, got {inner!r}")
    checked(dedup)
    wrapped = contextlib.asynccontextmanager(inner) if inspect.isasyncgenfunction(inner) else inner

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Mapping[str, Any]]:
        instance = dedup or default_dedup()
        await instance.start()
        try:
            if hasattr(app, "state"):  # a Starlette or FastAPI app (a bare Router has none)
                setattr(app.state, state_key, instance)
            if wrapped is None:
                yield {state_key: instance}
                return
            async with wrapped(app) as state:
                try:
                    yield {**(state or {}), state_key: instance}
                finally:
                    # Drain before the inner lifespan closes what running flights use
                    # (its HTTP clients, its pools).
                    await instance.aclose(drain_timeout=drain_timeout)
        finally:
            await instance.aclose(drain_timeout=drain_timeout)

    return run


class StatusSource(Protocol):
    """What the status app reads and steers: a ``Dedup`` or an ``Observer``."""

    namespace: str

    async def get_queue_status(self) -> QueueStatus: ...
    async def get_queue_items(self, limit: int | None = None) -> list[QueueItem]: ...
    async def clear_queue(self) -> int: ...
    async def update_config(self, **values: Any) -> None: ...


def status_app(
    source: StatusSource | None = None,
    *,
    control_token: str | None = None,
    items_limit: int = 100,
    refresh: float = 2.0,
) -> Starlette:
    """An ASGI app to mount anywhere, e.g. ``Mount("/dedupcall", status_app(dedup))``.

    ``/`` is a status page that refreshes itself every ``refresh`` seconds (queue,
    running and queued flights, live instances with their numbers, config, counters);
    ``/json`` is what the page shows, as JSON (503 while Redis is unavailable); ``/metrics``
    the Prometheus text (with the ``prometheus`` extra). Read-only unless
    ``control_token`` is set: then ``POST /clear`` and ``POST /config`` (a JSON object of
    shared settings) work for requests carrying ``Authorization: Bearer <token>``.
    ``source`` is a ``Dedup`` or an ``Observer``; default: the process-wide ``Dedup``.
    """
    if control_token is not None and (not isinstance(control_token, str) or len(control_token) < 8):
        raise ConfigError("control_token must be a string of at least 8 characters")
    if isinstance(items_limit, bool) or not isinstance(items_limit, int) or items_limit < 1:
        raise ConfigError(f"items_limit must be an int >= 1, got {items_limit!r}")
    validate({"refresh": refresh})
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from dedupcall import prometheus

    page = _page().replace("__REFRESH_MS__", str(int(refresh * 1000)))

    def resolve() -> StatusSource:
        return source if source is not None else default_dedup()

    async def index(request: Request) -> Response:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        html = page.replace("__BASE__", json.dumps(base).replace("<", "\\u003c"))
        return HTMLResponse(html, headers=NO_STORE)

    async def status_json(request: Request) -> Response:
        src = resolve()
        try:
            status = await src.get_queue_status()
            items = await src.get_queue_items(limit=items_limit)
        except RedisUnavailable as exc:
            return _error(503, "RedisUnavailable", str(exc))
        body = report.status_view(status, src.namespace)
        body.update(
            items=[report.item_view(i) for i in items],
            items_limit=items_limit,
            controls=control_token is not None,
            shared_fields=list(SHARED_FIELDS),
        )
        return JSONResponse(body, headers=NO_STORE)

    async def metrics(request: Request) -> Response:
        if not prometheus.AVAILABLE:
            return _error(501, "NotInstalled", 'pip install "dedupcall[prometheus]"')
        try:
            status = await resolve().get_queue_status()
        except RedisUnavailable as exc:
            return _error(503, "RedisUnavailable", str(exc))
        return Response(prometheus.render(status), media_type=prometheus.CONTENT_TYPE)

    def refused(request: Request) -> Response | None:
        if control_token is None:
            return _error(403, "ControlsDisabled", "this status app is read-only")
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), control_token.encode()
        ):
            return _error(401, "Unauthorized", "a valid control token is required")
        return None

    async def clear(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        try:
            removed = await resolve().clear_queue()
        except RedisUnavailable as exc:
            return _error(503, "RedisUnavailable", str(exc))
        return JSONResponse({"removed": removed, "message": f"removed {removed} flight(s)"})

    async def config(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "ConfigError", "the body must be a JSON object of settings")
        try:
            if not isinstance(body, dict) or not body:
                raise ConfigError("the body must be a non-empty JSON object of settings")
            values = {
                str(k): parse_env_value(str(k), v, label=str(k)) if isinstance(v, str) else v
                for k, v in body.items()
            }
            await resolve().update_config(**values)
        except ConfigError as exc:
            return _error(400, "ConfigError", str(exc))
        except RedisUnavailable as exc:
            return _error(503, "RedisUnavailable", str(exc))
        changed = ", ".join(f"{k}={v}" for k, v in values.items())
        return JSONResponse({"config": values, "message": f"set {changed}"})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/json", status_json),
            Route("/metrics", metrics),
            Route("/clear", clear, methods=["POST"]),
            Route("/config", config, methods=["POST"]),
        ]
    )


NO_STORE = {"Cache-Control": "no-store"}


def _page() -> str:
    return (resources.files("dedupcall") / "static" / "status.html").read_text("utf-8")


def _error(status: int, kind: str, message: str) -> JSONResponse:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": kind, "message": message}, status, headers=NO_STORE)
