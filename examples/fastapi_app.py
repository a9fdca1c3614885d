"""A FastAPI app whose instances call the upstream once per key between them.

    python examples/fastapi_app.py [--calls 60] [--keys 3] [--delay 0.2] [--url redis://...]

The app: ``/users/{user_id}`` answers from an async ``@queued_api`` function that calls
the upstream; ``dedupcall.lifespan(dedup)`` runs this instance's worker; ``/dedupcall/json``
is the queue status. Serve it yourself with
``REDIS_URL=redis://... UPSTREAM=http://... uvicorn fastapi_app:app --app-dir examples``.

Run as a script, it starts a local upstream that counts its hits, a Redis (``--url``, else
REDIS_URL or REDIS_HOST..., else an embedded server) and two uvicorn instances of this app,
sends ``--calls`` concurrent requests over ``--keys`` users to both, and stops them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import _local
import httpx
from fastapi import FastAPI, Request

import dedupcall
from dedupcall import queued_api
from dedupcall.asgi import status_app
from dedupcall.embedded import free_port

# --- the app, as each uvicorn instance imports it -------------------------------------
UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000")
# No dedup= anywhere: the process-wide Dedup is used, built on first use (at startup) from
# REDIS_URL (or REDIS_HOST...), DEDUPCALL_NAMESPACE and DEDUPCALL_* settings.
app = FastAPI(lifespan=dedupcall.lifespan())
app.mount("/dedupcall", status_app())


@queued_api(path="/api/users/{user_id}", ttl=60)
async def get_user(user_id: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=UPSTREAM) as client:
        response = await client.get(f"/api/users/{user_id}")
    response.raise_for_status()
    return response.json()


@app.get("/users/{user_id}")
async def user(user_id: int, request: Request) -> dict[str, Any]:
    return {"user": await get_user(user_id), "served_by": request.state.dedup.instance_id}


# --- the script: two instances of the app, many requests ----------------------------------
def start_instance(env: dict[str, str], procs: list[subprocess.Popen[bytes]]) -> str:
    """Start a uvicorn process serving this file's ``app`` on a free loopback port, add it
    to ``procs`` and return its base URL once it answers."""
    port = free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    command = [
        sys.executable, "-m", "uvicorn", "fastapi_app:app", "--app-dir", here,
        "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env)
    procs.append(proc)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/dedupcall/json").status_code == 200:
                return base  # its lifespan has started: the worker runs
        time.sleep(0.1)
    raise RuntimeError(f"the instance at {base} did not come up (exit code {proc.poll()})")


def stop(procs: list[subprocess.Popen[bytes]]) -> int:
    """SIGTERM each (uvicorn finishes open requests, then runs the lifespan shutdown);
    SIGKILL what is still running 15 s later. Returns how many had to be killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    killed = 0
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
    return killed


async def fire(bases: list[str], calls: int, keys: int) -> tuple[list[Any], dict[str, Any]]:
    """``calls`` concurrent requests, alternating between the instances; then the status."""
    async with httpx.AsyncClient(timeout=30) as client:
        urls = [f"{bases[i % len(bases)]}/users/{i % keys}" for i in range(calls)]
        responses = await asyncio.gather(*(client.get(url) for url in urls))
        status = (await client.get(f"{bases[0]}/dedupcall/json")).json()
    for response in responses:
        response.raise_for_status()
    return [response.json() for response in responses], status


def main(argv: list[str] | None = None) -> int:
    opts = _local.parser(__doc__, calls=60, keys=3).parse_args(argv)
    with _local.setup(opts, "fastapi") as (upstream, url, namespace):
        env = {**os.environ, "REDIS_URL": url, "DEDUPCALL_NAMESPACE": namespace}
        env["UPSTREAM"] = upstream.url
        procs: list[subprocess.Popen[bytes]] = []
        try:  # whatever happens, no instance is left running
            bases = [start_instance(env, procs) for _ in range(2)]
            print(f"two instances of the app: {', '.join(bases)}")
            answers, status = asyncio.run(fire(bases, opts.calls, opts.keys))
        finally:
            killed = stop(procs)
        served = Counter(answer["served_by"] for answer in answers)
        listed = sorted(instance["id"] for instance in status["instances"])
        print(f"{opts.calls} concurrent requests over {opts.keys} users, to both instances")
        print(f"  upstream hits: {upstream.describe('GET ')}")
        print(f"  answered by: {', '.join(f'{i} x{n}' for i, n in sorted(served.items()))}")
        print(f"  instances in /dedupcall/json: {', '.join(listed)}")
        print(f"stopped both instances with SIGTERM ({killed} needed a SIGKILL)")
    ok = len(listed) == 2 and sorted(served) == listed
    return _local.verdict(upstream.total(), opts.keys, opts.calls, " via 2 instances", ok=ok)


if __name__ == "__main__":
    sys.exit(main())
