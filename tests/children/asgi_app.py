"""The app real uvicorn processes serve in tests: the same endpoints as a Starlette app
(``starlette_app``) and a FastAPI app (``fastapi_app``), each calling the test upstream
through one entry point. Configured by the environment: REDIS_URL, DEDUPCALL_NAMESPACE
and DEDUPCALL_* settings (``Dedup.from_env()``), UPSTREAM (the upstream's base URL).

- ``/users/{user_id}?delay=``   async endpoint, async ``@queued_api`` function
- ``/reports/{report_id}?delay=`` sync endpoint (thread pool), sync ``@queued_api`` function
- ``/proxy/{name}?delay=``      async endpoint, ``AsyncDedupTransport`` client
- ``/sync-proxy/{name}?delay=`` sync endpoint, ``DedupTransport`` client
- ``/whoami``                   the instance id, read from ``request.state.dedup``
- ``/dedupcall/json``           the mounted status app
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import dedupcall
from dedupcall import AsyncDedupTransport, Dedup, DedupTransport, queued_api
from dedupcall.asgi import status_app

UPSTREAM = os.environ["UPSTREAM"]
dedup = Dedup.from_env()
sync_client = httpx.Client(transport=DedupTransport(dedup), base_url=UPSTREAM)
clients: dict[str, httpx.AsyncClient] = {}


@contextlib.asynccontextmanager
async def http_clients(app: Any) -> AsyncIterator[dict[str, Any]]:
    """The app's own lifespan, composed with dedupcall's: an async client per process."""
    async with (
        httpx.AsyncClient(base_url=UPSTREAM) as plain,
        httpx.AsyncClient(transport=AsyncDedupTransport(dedup), base_url=UPSTREAM) as deduped,
    ):
        clients["plain"] = plain
        yield {"http": deduped}


@queued_api(path="/users/{user_id}", dedup=dedup)
async def get_user(user_id: int, delay: float = 0.0) -> Any:
    response = await clients["plain"].get(f"/value/users/{user_id}", params={"delay": delay})
    response.raise_for_status()
    return response.json()


@queued_api(path=lambda report_id, **_: f"/reports/{report_id}", dedup=dedup)
def build_report(report_id: str, delay: float = 0.0) -> Any:
    with httpx.Client(base_url=UPSTREAM) as client:
        response = client.get(f"/value/reports/{report_id}", params={"delay": delay})
    response.raise_for_status()
    return response.json()


def _delay(request: Request) -> float:
    return float(request.query_params.get("delay", 0))


async def users(request: Request) -> JSONResponse:
    return JSONResponse(await get_user(int(request.path_params["user_id"]), _delay(request)))


def reports(request: Request) -> JSONResponse:  # sync: Starlette runs it in a thread
    return JSONResponse(build_report(request.path_params["report_id"], _delay(request)))


async def proxy(request: Request) -> JSONResponse:
    name, delay = request.path_params["name"], _delay(request)
    response = await request.state.http.get(f"/value/proxy/{name}", params={"delay": delay})
    return JSONResponse(
        {"body": response.json(), "dedupcall": response.extensions["dedupcall"]},
        status_code=response.status_code,
    )


def sync_proxy(request: Request) -> JSONResponse:
    name, delay = request.path_params["name"], _delay(request)
    response = sync_client.get(f"/value/sync-proxy/{name}", params={"delay": delay})
    return JSONResponse(
        {"body": response.json(), "dedupcall": response.extensions["dedupcall"]},
        status_code=response.status_code,
    )


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"instance_id": request.state.dedup.instance_id})


ROUTES = [
    Route("/users/{user_id}", users),
    Route("/reports/{report_id}", reports),
    Route("/proxy/{name}", proxy),
    Route("/sync-proxy/{name}", sync_proxy),
    Route("/whoami", whoami),
    Mount("/dedupcall", status_app(dedup)),
]

starlette_app = Starlette(routes=ROUTES, lifespan=dedupcall.lifespan(dedup, inner=http_clients))

fastapi_app = FastAPI(lifespan=dedupcall.lifespan(dedup, inner=http_clients))
for route in ROUTES:
    fastapi_app.router.routes.append(route)
