"""Child process: one instance calling the test upstream through an entry point, then a
JSON summary on its last line.

Usage: python entry_caller.py '<json spec>'. Spec fields: url, namespace, upstream,
config (dict), start_at (epoch seconds: every process fires at that moment), mode, and:
- decorator: keys, callers (per key and way), delay. Calls an async method, an async
  classmethod and a sync function (from threads) decorated with @queued_api.
- transport: flavour ("sync" | "async"), paths (upstream paths with query), callers
  (per path), max_body_bytes. Sends GETs through DedupTransport / AsyncDedupTransport.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
import time
from typing import Any

import httpx

from dedupcall import AsyncDedupTransport, Dedup, DedupError, DedupTransport, queued_api


def decorated(dedup: Dedup, upstream: str, delay: float) -> tuple[Any, Any]:
    def fetch(path: str) -> Any:
        response = httpx.get(f"{upstream}{path}", params={"delay": delay})
        response.raise_for_status()
        return response.json()

    class Users:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @queued_api(path="/method/{self.tenant}/{key}", dedup=dedup)
        async def get(self, key: str) -> Any:
            return await asyncio.to_thread(fetch, f"/value/method/{self.tenant}/{key}")

        @queued_api(path="/classmethod/{key}", dedup=dedup)
        @classmethod
        async def lookup(cls, key: str) -> Any:
            return await asyncio.to_thread(fetch, f"/value/classmethod/{key}")

    @queued_api(path=lambda key: f"/sync/{key}", dedup=dedup)
    def report(key: str) -> Any:
        return fetch(f"/value/sync/{key}")

    return Users, report


async def run_decorator(dedup: Dedup, spec: dict[str, Any]) -> dict[str, Any]:
    users, report = decorated(dedup, spec["upstream"], spec.get("delay", 0.3))
    results: dict[str, list[str]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def record(name: str, value: Any) -> None:
        with lock:
            results.setdefault(name, []).append(value["exec_id"])

    async def async_call(name: str, call: Any) -> None:
        try:
            record(name, await call)
        except DedupError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    def sync_call(key: str) -> None:
        try:
            record(f"sync/{key}", report(key))
        except DedupError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    await dedup.start()
    wait_until(spec["start_at"])
    calls = []
    threads = []
    for key in spec["keys"]:
        for _ in range(spec.get("callers", 5)):
            calls.append(async_call(f"method/{key}", users("acme").get(key)))
            calls.append(async_call(f"classmethod/{key}", users.lookup(key)))
            threads.append(threading.Thread(target=sync_call, args=(key,)))
    for thread in threads:
        thread.start()
    await asyncio.gather(*calls)
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    return {"results": results, "errors": errors}


def summary(outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, httpx.Response):
        return {
            "status": outcome.status_code,
            "sha256": hashlib.sha256(outcome.content).hexdigest(),
            "length": len(outcome.content),
            "outcome": outcome.extensions["dedupcall"]["outcome"],
        }
    return {
        "error": type(outcome).__name__,
        "transport_error": isinstance(outcome, httpx.TransportError),
    }


def run_sync_transport(dedup: Dedup, spec: dict[str, Any]) -> dict[str, Any]:
    transport = DedupTransport(dedup, max_body_bytes=spec.get("max_body_bytes", 10 * 2**20))
    out: dict[str, list[dict[str, Any]]] = {path: [] for path in spec["paths"]}
    lock = threading.Lock()
    with httpx.Client(transport=transport, base_url=spec["upstream"], timeout=30) as client:

        def get(path: str) -> None:
            try:
                outcome: Any = client.get(path)
            except Exception as exc:
                outcome = exc
            with lock:
                out[path].append(summary(outcome))

        client.get("/value/warm-up")  # starts the loop thread and the worker
        wait_until(spec["start_at"])
        threads = [
            threading.Thread(target=get, args=(path,))
            for path in spec["paths"]
            for _ in range(spec.get("callers", 5))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"responses": out}


async def run_async_transport(dedup: Dedup, spec: dict[str, Any]) -> dict[str, Any]:
    transport = AsyncDedupTransport(dedup, max_body_bytes=spec.get("max_body_bytes", 10 * 2**20))
    async with httpx.AsyncClient(
        transport=transport, base_url=spec["upstream"], timeout=30
    ) as client:
        await dedup.start()
        wait_until(spec["start_at"])
        paths = [path for path in spec["paths"] for _ in range(spec.get("callers", 5))]
        outcomes = await asyncio.gather(*[client.get(p) for p in paths], return_exceptions=True)
    out: dict[str, list[dict[str, Any]]] = {path: [] for path in spec["paths"]}
    for path, outcome in zip(paths, outcomes, strict=True):
        out[path].append(summary(outcome))
    return {"responses": out}


def wait_until(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def main() -> None:
    spec = json.loads(sys.argv[1])
    dedup = Dedup(spec["url"], namespace=spec["namespace"], **spec.get("config", {}))
    if spec["mode"] == "transport" and spec["flavour"] == "sync":
        out = run_sync_transport(dedup, spec)
        dedup.close()
    else:
        runner = run_decorator if spec["mode"] == "decorator" else run_async_transport

        async def run() -> dict[str, Any]:
            async with dedup:
                return await runner(dedup, spec)

        out = asyncio.run(run())
    out["stats"] = dedup.stats()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
