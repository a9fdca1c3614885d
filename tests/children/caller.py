"""Child process: one Dedup instance doing one job, then a JSON summary on its last line.

Usage: python caller.py '<json spec>'. Spec fields: url, namespace, upstream, config (dict),
mode ("call" | "config" | "worker"), and per mode:
- call: keys (list), callers (per key), delay (upstream seconds), timeout; crash: true
  makes the call kill the process that runs it
- config: expect (dict of shared values to wait for), within (seconds)
- submit: api_path, target (url): queue one GET request, print its id, then hang
- worker: runs until SIGTERM, then drains and exits 0; prints "config {...}" whenever
  the shared config it follows changes
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time

import httpx

from dedupcall import Dedup, DedupError


async def fetch_value(client: httpx.AsyncClient, upstream: str, key: str, delay: float) -> object:
    response = await client.get(f"{upstream}/value{key}", params={"delay": delay})
    response.raise_for_status()
    return response.json()


async def crash() -> None:
    os._exit(1)  # a poison call: whoever runs it dies


async def run_calls(dedup: Dedup, spec: dict) -> dict:
    results: dict[str, list] = {}
    errors: list[str] = []
    async with httpx.AsyncClient() as client:

        async def one(key: str) -> None:
            try:
                value = await dedup.call(
                    key,
                    crash
                    if spec.get("crash")
                    else lambda: fetch_value(client, spec["upstream"], key, spec.get("delay", 0.1)),
                    timeout=spec.get("timeout", 30.0),
                )
                results.setdefault(key, []).append(value)
            except DedupError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        print("calling", flush=True)
        await asyncio.gather(*[one(k) for k in spec["keys"] for _ in range(spec.get("callers", 1))])
    return {"results": results, "errors": errors}


async def wait_config(dedup: Dedup, spec: dict) -> dict:
    start = time.monotonic()
    print("watching", flush=True)
    while time.monotonic() - start < spec.get("within", 5.0):
        if all(getattr(dedup.config, k) == v for k, v in spec["expect"].items()):
            return {"seen_after": time.monotonic() - start}
        await asyncio.sleep(0.01)
    return {"seen_after": None}


async def submit_and_hang(dedup: Dedup, spec: dict) -> dict:
    rid = await dedup.add_get_request(spec["api_path"], spec["target"])
    print(json.dumps({"request_id": rid}), flush=True)
    await asyncio.sleep(3600)
    return {}


async def run_worker(dedup: Dedup) -> dict:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("working", flush=True)
    seen = None
    while not stop.is_set():  # report the shared config as this instance follows it
        if dedup.config.shared() != seen:
            seen = dedup.config.shared()
            print("config " + json.dumps(seen), flush=True)
        with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError on 3.10
            await asyncio.wait_for(stop.wait(), 0.01)
    return {}


def dump_tasks() -> None:
    """SIGUSR1: print every task's stack to stderr (to diagnose a hung child)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def main() -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    spec = json.loads(sys.argv[1])
    dedup = Dedup(spec["url"], namespace=spec["namespace"], **spec.get("config", {}))
    async with dedup:
        print(json.dumps({"instance_id": dedup.instance_id}), flush=True)
        mode = spec.get("mode", "call")
        if mode == "call":
            out = await run_calls(dedup, spec)
        elif mode == "config":
            out = await wait_config(dedup, spec)
        elif mode == "submit":
            out = await submit_and_hang(dedup, spec)
        else:
            out = await run_worker(dedup)
    # after the drain: an execution still finishing when the calls returned is counted too
    out["stats"] = dedup.stats()
    out["instance_id"] = dedup.instance_id
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
