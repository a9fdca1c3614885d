"""Child process: an instance that does some work and then stops gracefully, as a deploy
stops a service; a JSON summary on its last line.

Usage: python stopping.py '<json spec>'. Spec fields: url, namespace, upstream, config,
drain_timeout, mode, and per mode:
- queue: paths (upstream paths): queue a GET of each, print their ids, then stop.
- sync: key, seconds: a sync @queued_api function sleeps that long in a thread, then
  fetches the upstream; once it runs, close() is called from the main thread.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import httpx

from dedupcall import Dedup, DedupError, queued_api


async def queue_then_stop(dedup: Dedup, spec: dict[str, Any]) -> dict[str, Any]:
    ids = [await dedup.add_get_request(path, f"{spec['upstream']}{path}") for path in spec["paths"]]
    print(json.dumps({"request_ids": ids}), flush=True)
    await dedup.aclose(drain_timeout=spec["drain_timeout"])
    return {"request_ids": ids}


def sync_then_close(dedup: Dedup, spec: dict[str, Any]) -> dict[str, Any]:
    started = threading.Event()
    out: dict[str, Any] = {}

    @queued_api(path="/sync/{key}", dedup=dedup)
    def slow(key: str) -> Any:
        started.set()
        time.sleep(spec["seconds"])
        return httpx.get(f"{spec['upstream']}/value/sync/{key}").json()

    def caller() -> None:
        try:
            out["value"] = slow(spec["key"])
        except DedupError as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=caller)
    thread.start()
    started.wait(30)
    print("running", flush=True)
    began = time.monotonic()
    dedup.close(drain_timeout=spec["drain_timeout"])
    out["close_seconds"] = time.monotonic() - began
    thread.join(30)
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    dedup = Dedup(spec["url"], namespace=spec["namespace"], **spec.get("config", {}))
    if spec["mode"] == "sync":
        out = sync_then_close(dedup, spec)
    else:
        out = asyncio.run(queue_then_stop(dedup, spec))
    out["stats"] = {k: v for k, v in dedup.stats().items() if isinstance(v, int)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
