"""The entry points across real processes: two uvicorn instances of a Starlette app and of
a FastAPI app, the decorator and the transports in three processes each, and a lifespan
shutdown while a flight runs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dedup_fixtures import FAST
from dedupcall import Dedup
from procs import Proc, Spawner
from upstream import Upstream


def serve(
    spawn: Spawner,
    app: str,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    graceful: float | None = None,
    **config: float,
) -> tuple[Proc, str]:
    """Start one uvicorn instance of ``tests/children/asgi_app.py``; return it and its URL."""
    env = {
        "REDIS_URL": redis_url,
        "DEDUPCALL_NAMESPACE": namespace,
        "UPSTREAM": upstream.url,
        **{f"DEDUPCALL_{k.upper()}": str(v) for k, v in {**FAST, **config}.items()},
    }
    args = [f"asgi_app:{app}"] + ([] if graceful is None else [graceful])
    proc = spawn("serve.py", *args, env=env)
    port = proc.wait_line("listening", timeout=30).split()[1]
    return proc, f"http://127.0.0.1:{port}"


async def until_up(client: httpx.AsyncClient, base: str) -> str:
    """Wait until the instance answers; return its instance id."""
    for _ in range(300):
        try:
            return str((await client.get(f"{base}/whoami")).json()["instance_id"])
        except httpx.TransportError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{base} never answered")


@pytest.mark.parametrize("app", ["starlette_app", "fastapi_app"])
async def test_two_uvicorn_instances_call_the_upstream_once_per_key(
    app: str, spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream
) -> None:
    instances = [serve(spawn, app, redis_url, namespace, upstream) for _ in range(2)]
    bases = [base for _, base in instances]
    async with httpx.AsyncClient(timeout=30) as client:
        ids = {await until_up(client, base) for base in bases}
        assert len(ids) == 2
        routes = {"users": "7", "reports": "r7", "proxy": "p7", "sync-proxy": "s7"}
        requests = [
            f"{bases[i % 2]}/{route}/{name}?delay=0.4"
            for route, name in routes.items()
            for i in range(24)
        ]
        responses = await asyncio.gather(*[client.get(url) for url in requests])
        status = (await client.get(f"{bases[0]}/dedupcall/json")).json()
    assert [r.status_code for r in responses] == [200] * len(requests)
    for route, name in routes.items():
        assert upstream.hits(f"/value/{route}/{name}") == 1, upstream.stats()
    bodies = [r.json() for r in responses]
    exec_ids = [b.get("exec_id") or b["body"]["exec_id"] for b in bodies]
    assert len(set(exec_ids)) == len(routes)  # everyone got the one execution per key
    outcomes = [b["dedupcall"]["outcome"] for b in bodies if "dedupcall" in b]
    assert outcomes.count("executed") == 2  # one per transport key, the rest joined
    assert sorted(i["id"] for i in status["instances"]) == sorted(ids)
    assert upstream.hits() == len(routes)


def entry_child(
    spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream, **spec: Any
) -> Proc:
    spec = {
        "url": redis_url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": FAST,
        **spec,
    }
    return spawn("entry_caller.py", json.dumps(spec))


async def test_decorator_on_methods_classmethods_and_sync_functions_across_three_processes(
    spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream
) -> None:
    keys = ["k1", "k2", "k3"]
    start_at = time.time() + 3.0
    procs = [
        entry_child(
            spawn, redis_url, namespace, upstream, mode="decorator", keys=keys, start_at=start_at
        )
        for _ in range(3)
    ]
    outs = [await asyncio.to_thread(p.json, 60) for p in procs]
    for out in outs:
        assert out["errors"] == []
    for way in ("method/acme", "classmethod", "sync"):
        for key in keys:
            assert upstream.hits(f"/value/{way}/{key}") == 1, upstream.stats()
    for name in outs[0]["results"]:
        exec_ids = {e for out in outs for e in out["results"][name]}
        assert len(exec_ids) == 1, name
        assert sum(len(out["results"][name]) for out in outs) == 15
    assert sum(out["stats"]["executed"] for out in outs) == 9
    assert sum(out["stats"]["joined"] + out["stats"]["cached"] for out in outs) == 3 * 45 - 9


def expected_sha(n: int) -> str:
    return hashlib.sha256(random.Random(n).randbytes(n)).hexdigest()


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_transports_across_three_processes(
    flavour: str, spawn: Spawner, redis_url: str, namespace: str, upstream: Upstream
) -> None:
    paths = ["/value/t1?delay=0.3", "/bytes/200000?delay=0.3", "/bytes/120000?delay=0.3&chunked=1"]
    start_at = time.time() + 3.0
    procs = [
        entry_child(
            spawn,
            redis_url,
            namespace,
            upstream,
            mode="transport",
            flavour=flavour,
            paths=paths,
            callers=4,
            max_body_bytes=150_000,
            start_at=start_at,
        )
        for _ in range(3)
    ]
    outs = [await asyncio.to_thread(p.json, 60) for p in procs]
    assert upstream.hits("/value/t1") == upstream.hits("/bytes/200000") == 1
    assert upstream.hits("/bytes/120000") == 1

    def every(path: str) -> list[dict[str, Any]]:
        return [r for out in outs for r in out["responses"][path]]

    small = every(paths[0])
    assert all(r["status"] == 200 for r in small) and len(small) == 12
    binary = every(paths[1])  # over max_body_bytes: only its sender has it, whole
    sent = [r for r in binary if "sha256" in r]
    assert len(sent) == 1 and sent[0]["sha256"] == expected_sha(200000)
    assert sent[0]["outcome"] == "executed"
    refused = [r for r in binary if "error" in r]
    assert len(refused) == 11
    assert all(r["error"] == "ResponseTooLarge" and r["transport_error"] for r in refused)
    shared = every(paths[2])  # under the limit, chunked: byte-identical everywhere
    assert len(shared) == 12 and {r["sha256"] for r in shared} == {expected_sha(120000)}
    assert sorted({r["outcome"] for r in shared}) in (
        ["executed", "joined"],
        ["cached", "executed", "joined"],
    )


async def flight_of(watch: Dedup, key: str, predicate: Callable[[Any], bool]) -> Any:
    for _ in range(500):
        item = await watch.get_flight_by_key(key)
        if item is not None and predicate(item):
            return item
        await asyncio.sleep(0.02)
    raise AssertionError(f"the flight of {key} never got there: {item}")


@pytest.mark.parametrize("handover", [False, True], ids=["drained", "handed-over"])
async def test_lifespan_shutdown_during_a_running_flight(
    handover: bool,
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    """SIGTERM the instance that runs a flight another instance waits for. With a long
    enough drain the flight completes there; with a short one it is handed back and the
    other instance runs it. Either way every waiter gets an answer."""
    graceful, drain = (0.1, 0.1) if handover else (None, 5.0)
    a, a_url = serve(
        spawn, "starlette_app", redis_url, namespace, upstream, graceful, drain_timeout=drain
    )
    _, b_url = serve(spawn, "starlette_app", redis_url, namespace, upstream)
    watch = make_dedup()
    async with httpx.AsyncClient(timeout=30) as client:
        a_id, _ = await until_up(client, a_url), await until_up(client, b_url)
        from_a = asyncio.create_task(client.get(f"{a_url}/users/5?delay=1.0"))
        await flight_of(watch, "/users/5", lambda f: f.state == "running" and f.executor == a_id)
        from_b = asyncio.create_task(client.get(f"{b_url}/users/5?delay=1.0"))
        await flight_of(watch, "/users/5", lambda f: f.waiters == 2)
        a.kill(signal.SIGTERM)
        started = time.monotonic()
        b_response = await from_b
        waited = time.monotonic() - started
        a_outcome = await asyncio.gather(from_a, return_exceptions=True)
    await asyncio.to_thread(a.wait, 15)  # the instance exits: drain and close finished
    assert b_response.status_code == 200
    assert waited < 8.0  # answered: no hang (lease 1 s, reaper 0.2 s, upstream 1 s)
    if handover:
        assert b_response.json()["hit"] == 2  # b ran it again after a handed it back
        assert upstream.hits("/value/users/5") == 2
    else:
        assert b_response.json()["hit"] == 1  # completed by a while it drained
        assert upstream.hits("/value/users/5") == 1
        assert isinstance(a_outcome[0], httpx.Response) and a_outcome[0].status_code == 200
        assert a_outcome[0].json()["exec_id"] == b_response.json()["exec_id"]
    status = await watch.get_queue_status()
    assert a_id not in [i.id for i in status.instances]  # a retired itself
