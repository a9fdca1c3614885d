"""dedupcall.lifespan and status_app in one process (Starlette's TestClient runs the
lifespan on its own loop); real uvicorn processes are in test_entry_processes.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import dedupcall
from dedupcall import ConfigError, Dedup, RedisUnavailable, queued_api
from dedupcall.asgi import status_app
from dedupcall.embedded import free_port


def test_lifespan_runs_the_worker_and_shares_the_dedup(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup()
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def mine(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append(f"inner start, dedup ready: {dedup._ready}")
        yield {"db": "connection"}
        events.append(f"inner stop, dedup ready: {dedup._ready}")

    @queued_api(path="/answer", dedup=dedup)
    async def answer() -> int:
        return 42

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "same": request.state.dedup is dedup and request.app.state.dedup is dedup,
                "db": request.state.db,
                "answer": await answer(),
                "instances": len((await request.state.dedup.get_queue_status()).instances),
            }
        )

    app = Starlette(routes=[Route("/", endpoint)], lifespan=dedupcall.lifespan(dedup, inner=mine))
    with TestClient(app) as client:
        assert client.get("/").json() == {
            "same": True,
            "db": "connection",
            "answer": 42,
            "instances": 1,
        }
        assert dedup.worker.started  # the worker runs while the app does
    # The Dedup drained (and closed) before the inner lifespan's cleanup ran.
    assert events == ["inner start, dedup ready: True", "inner stop, dedup ready: False"]
    assert dedup._closed and not dedup._ready  # drained and closed at shutdown


def test_fastapi_lifespan_with_an_async_generator_inner(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup()

    async def mine(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"greeting": "hello"}

    app = FastAPI(lifespan=dedupcall.lifespan(dedup, inner=mine, state_key="dc"))

    @app.get("/")
    async def root(request: Request) -> dict[str, Any]:
        return {"greeting": request.state.greeting, "id": request.state.dc.instance_id}

    with TestClient(app) as client:
        assert client.get("/").json() == {"greeting": "hello", "id": dedup.instance_id}


def test_startup_error_propagates() -> None:
    down = Dedup(f"redis://127.0.0.1:{free_port()}/0", namespace="down", socket_timeout=0.5)
    app = Starlette(lifespan=dedupcall.lifespan(down))
    with pytest.raises(RedisUnavailable), TestClient(app):
        pass


def test_bad_lifespan_arguments() -> None:
    with pytest.raises(ConfigError, match="inner"):
        dedupcall.lifespan(None, inner="not callable")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drain_timeout"):
        dedupcall.lifespan(None, drain_timeout=-1)
    with pytest.raises(ConfigError, match="Dedup"):
        dedupcall.lifespan("redis://x")  # type: ignore[arg-type]


def test_status_app_serves_queue_status_json(make_sync_dedup: Callable[..., Dedup]) -> None:
    dedup = make_sync_dedup()
    app = Starlette(
        routes=[Mount("/dedupcall", status_app(dedup))], lifespan=dedupcall.lifespan(dedup)
    )
    with TestClient(app) as client:
        body = client.get("/dedupcall/json").json()
    assert body["instance_id"] == dedup.instance_id
    assert (body["queue_length"], body["running"], body["processing"]) == (0, 0, False)
    assert [i["id"] for i in body["instances"]] == [dedup.instance_id]
    assert body["config"]["lock_timeout"] == dedup.config.lock_timeout


def test_status_app_answers_503_while_redis_is_down(make_redis_server: Callable[..., Any]) -> None:
    server = make_redis_server()
    dedup = Dedup(server.url, namespace="st", socket_timeout=0.5, heartbeat_interval=0.2)
    app = Starlette(
        routes=[Mount("/dedupcall", status_app(dedup))], lifespan=dedupcall.lifespan(dedup)
    )
    with TestClient(app) as client:
        assert client.get("/dedupcall/json").status_code == 200
        server.stop()
        down = client.get("/dedupcall/json")
        assert down.status_code == 503 and down.json()["error"] == "RedisUnavailable"


def test_the_lifespan_can_run_again(make_sync_dedup: Callable[..., Dedup]) -> None:
    dedup = make_sync_dedup()

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.state.dedup.instance_id})

    app = Starlette(routes=[Route("/", whoami)], lifespan=dedupcall.lifespan(dedup))
    ids = []
    for _ in range(2):  # e.g. a TestClient per test
        with TestClient(app) as client:
            ids.append(client.get("/").json()["id"])
    assert ids[0] != ids[1]  # each run is a new instance of the same Dedup


def test_a_dedup_first_used_by_sync_code_moves_to_the_app_loop(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup()

    @queued_api(path="/at-import", dedup=dedup)
    def at_import() -> int:
        return 7

    assert at_import() == 7  # on the private loop thread of sync callers
    app = Starlette(lifespan=dedupcall.lifespan(dedup))
    with TestClient(app):
        assert dedup.sync.thread is None  # closed there, started on the app's loop
        assert dedup._ready


async def test_aclose_after_rebinding_really_closes(
    make_redis_server: Callable[..., Any],
) -> None:
    import asyncio

    server = make_redis_server()
    dedup = Dedup(server.url, namespace="rebind", socket_timeout=0.5, heartbeat_interval=0.2)

    @queued_api(path="/first", dedup=dedup)
    def first() -> int:
        return 1

    server.kill()
    with pytest.raises(RedisUnavailable):
        await asyncio.to_thread(first)  # a failed first use on the private loop thread
    server.restart()  # the same port
    assert await dedup.call("/second", lambda: asyncio.sleep(0, 2)) == 2  # bound here now
    await dedup.aclose()
    assert not dedup._ready and dedup.sync.thread is None
    watch = Dedup(server.url, namespace="rebind")
    assert [i.id for i in (await watch.get_queue_status()).instances] == [watch.instance_id]
    await watch.aclose()
