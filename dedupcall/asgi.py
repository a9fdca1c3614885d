"""Starlette/FastAPI integration: a lifespan that runs this instance's worker, and a
mountable status app. A plain Starlette lifespan: it installs no signal handlers (the
server owns them) and lets startup errors propagate."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dedupcall.config import validate
from dedupcall.core import Dedup
from dedupcall.entry import checked, default_dedup
from dedupcall.errors import ConfigError, RedisUnavailable

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


def status_app(dedup: Dedup | None = None) -> Starlette:
    """A read-only ASGI app to mount anywhere, e.g. ``Mount("/dedupcall", status_app(d))``:
    ``/json`` is ``get_queue_status()`` as JSON (503 while Redis is unavailable)."""

    async def status_json(request: Request) -> JSONResponse:
        instance = dedup or default_dedup()
        try:
            status = await instance.get_queue_status()
        except RedisUnavailable as exc:
            return JSONResponse({"error": "RedisUnavailable", "message": str(exc)}, 503)
        return JSONResponse(dataclasses.asdict(status))

    return Starlette(routes=[Route("/json", status_json)])
