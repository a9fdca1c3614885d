"""A fault-campaign child: one ``Dedup`` instance making the calls its spec file describes.

Usage: ``python tests/faults/instance.py SPEC.json``. It prints ``ready <instance id>`` once
started, and appends JSON lines to the spec's ``records`` file (flushed every 0.2 s, so a
``kill -9`` loses at most that much):

- ``["ready", instance_id, pid]``
- ``[wave, index, outcome, request_id, attempts, path, hit, exec_id, wait, error]`` per
  finished caller; ``outcome`` is ``ok`` (a success whose body is recorded), ``failed``
  (the flight's failure, e.g. ``CallFailed``), ``typed`` (another ``DedupError``),
  ``untyped`` (any other exception), ``wrong`` (a payload that did not round-trip),
  ``cancelled`` (this child cancelled the caller on purpose)
- ``["hung", wave, index, waited]`` for a caller still waiting past its deadline + grace
- ``["done", pending]`` when the calls are over, ``["end", stats]`` once the instance closed

Spec: ``url, namespace, upstream, config, records, parent`` and ``waves``: a list of
``{keys, callers, delay, timeout, via (call|request|transport), start, cancel, query,
retry, payload}``; a wave with ``load: {seconds, hot, tail, hot_share, think}`` instead
loops ``callers`` callers over ``load_key(prefix, i)`` keys until ``seconds`` have passed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from dedupcall import AsyncDedupTransport, Dedup, DedupError, Result

GRACE = 2.0  # past a caller's timeout, how long before it counts as hung
_SAFE = re.compile(rb"/[A-Za-z0-9/_.-]{0,200}")
Key = str | bytes
Record = list[Any]


def decode_key(value: Any) -> Key:
    """Keys travel in JSON as text, or as ``{"b64": ...}`` for bytes."""
    return base64.b64decode(value["b64"]) if isinstance(value, dict) else str(value)


def encode_key(key: Key) -> Any:
    return {"b64": base64.b64encode(key).decode()} if isinstance(key, bytes) else key


def upstream_path(key: Key) -> str:
    """The upstream path that serves ``key``: readable for plain keys, else a digest, so a
    body's ``path`` proves which key it was made for."""
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    if _SAFE.fullmatch(raw):
        return "/value" + raw.decode()
    return "/h/" + hashlib.sha256(raw).hexdigest()[:24]


def load_key(prefix: str, index: int, hot: int) -> str:
    """The ``index``-th key of a load wave: ``hot`` hot keys, then the long tail."""
    return f"{prefix}/hot/{index}" if index < hot else f"{prefix}/tail/{index - hot}"


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


PAYLOADS: dict[str, Callable[[], Any]] = {
    "control": lambda: "nul\x00 crlf\r\n tab\t {braces} *?[glob]\\ \u202eRTL \ufeffBOM",
    "latin1": lambda: bytes(range(256)).decode("latin-1"),
    "big": lambda: "x" * 1_000_000,
    "nan": lambda: [math.nan, math.inf],
    "deep": lambda: _deep(10_000),
    "surrogate": lambda: "lone \ud800 surrogate",
}


def same_payload(got: Any, want: Any) -> bool:
    """Equality that counts NaN as equal to NaN (and survives 10k-deep nesting)."""
    try:
        return json.dumps(got, allow_nan=True) == json.dumps(want, allow_nan=True)
    except RecursionError:  # the deep payload: compare its shape without recursion
        while isinstance(got, list) and isinstance(want, list) and len(got) == len(want) == 1:
            got, want = got[0], want[0]
        return bool(got == want == [])


class Caller:
    """Runs one wave's calls through one of the three entry points and records them."""

    def __init__(self, dedup: Dedup, spec: dict[str, Any], out: list[Record]) -> None:
        self.dedup, self.spec, self.out = dedup, spec, out
        self.client = httpx.AsyncClient(timeout=60)
        self.transport = httpx.AsyncClient(transport=AsyncDedupTransport(dedup), timeout=60)
        self.pending: dict[int, tuple[int, int, float, float]] = {}  # wave, i, start, limit
        self.tokens = itertools.count()
        self.hung: set[int] = set()

    async def one(self, n: int, key: Key, wave: dict[str, Any], cancel_at: float | None) -> None:
        timeout = float(wave.get("timeout", 10.0))
        start = time.monotonic()
        token = next(self.tokens)
        self.pending[token] = (wave["n"], n, start, start + timeout + GRACE)
        task = asyncio.ensure_future(self.attempt(key, wave, timeout))
        if cancel_at is not None:
            asyncio.get_running_loop().call_later(cancel_at, task.cancel)
        try:
            rec = await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            rec = ["cancelled", None, 0, None, None, None, "cancelled"]
        except DedupError as exc:
            rec = ["typed", getattr(exc, "request_id", None), 0, None, None, None, _name(exc)]
        except Exception as exc:
            rec = ["untyped", None, 0, None, None, None, _name(exc)]
        finally:
            self.pending.pop(token, None)
        self.out.append(
            [wave["n"], n, rec[0], *rec[1:6], round(time.monotonic() - start, 4), rec[6]]
        )

    async def attempt(self, key: Key, wave: dict[str, Any], timeout: float) -> Record:
        path = upstream_path(key)
        params = {"delay": wave.get("delay", 0.1), **wave.get("query", {})}
        url = f"{self.spec['upstream']}{path}"
        via = wave.get("via", "call")
        if via == "transport":
            opts = {"dedupcall": {"timeout": timeout}}
            response = await self.transport.get(url, params=params, extensions=opts)
            rid = response.extensions.get("dedupcall", {}).get("request_id")
            if response.status_code != 200:
                return ["failed", rid, 0, None, None, None, f"HTTP {response.status_code}"]
            body = response.json()
            return ["ok", rid, 0, body.get("path"), body.get("hit"), body.get("exec_id"), None]
        if via == "request":
            target = str(httpx.URL(url, params=params))
            api_path = key if isinstance(key, str) else key.decode("latin-1")
            rid = await self.dedup.add_get_request(api_path, target, on_conflict="join")
            return self.judge(await self.dedup.wait_for_result(rid, timeout=timeout), None)
        payload = wave.get("payload")

        async def fetch() -> Any:
            response = await self.client.get(url, params=params)
            response.raise_for_status()
            body = response.json()
            if payload:
                body["payload"] = PAYLOADS[payload]()
            return body

        retry = (httpx.HTTPError,) if wave.get("retry") else ()
        result = await self.dedup.call_result(key, fetch, timeout=timeout, retry_on=retry)
        return self.judge(result, PAYLOADS[payload]() if payload else None)

    @staticmethod
    def judge(result: Result, payload: Any) -> Record:
        rid, attempts = result.request_id, result.attempts
        if not result.success:
            return ["failed", rid, attempts, None, None, None, result.error_type]
        body = result.data if isinstance(result.data, dict) else {}
        outcome = "ok"
        if payload is not None and not same_payload(body.get("payload"), payload):
            outcome = "wrong"
        hit, exec_id = body.get("hit"), body.get("exec_id")
        return [outcome, rid, attempts, body.get("path"), hit, exec_id, None]

    async def wave(self, wave: dict[str, Any]) -> None:
        await asyncio.sleep(float(wave.get("start", 0.0)))
        rng = random.Random()
        if "load" in wave:
            await self.load(wave, rng)
            return
        keys = [decode_key(k) for k in wave["keys"]]
        calls = [(i, k) for i, k in enumerate(keys) for _ in range(int(wave.get("callers", 1)))]
        rng.shuffle(calls)
        share, window = float(wave.get("cancel", 0.0)), float(wave.get("cancel_within", 1.5))
        cancel = [rng.uniform(0, window) if rng.random() < share else None for _ in calls]
        await asyncio.gather(*[self.one(i, k, wave, cancel[j]) for j, (i, k) in enumerate(calls)])

    async def load(self, wave: dict[str, Any], rng: random.Random) -> None:
        spec = wave["load"]
        hot, tail, think = int(spec["hot"]), int(spec["tail"]), float(spec["think"])
        until = time.monotonic() + float(spec["seconds"])

        async def loop() -> None:
            while time.monotonic() < until:
                hot_one = rng.random() < float(spec["hot_share"])
                i = rng.randrange(hot) if hot_one else hot + rng.randrange(tail)
                await self.one(i, load_key(spec["prefix"], i, hot), wave, None)
                await asyncio.sleep(rng.uniform(0, 2 * think))

        await asyncio.gather(*[loop() for _ in range(int(wave["callers"]))])

    async def watch(self) -> None:
        """Report callers waiting past their deadline (once each)."""
        while True:
            now = time.monotonic()
            for token, (wave, i, start, limit) in list(self.pending.items()):
                if now > limit and token not in self.hung:
                    self.hung.add(token)
                    self.out.append(["hung", wave, i, round(now - start, 3)])
            await asyncio.sleep(0.25)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.transport.aclose()


def _name(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class Records:
    """The record file: lines are buffered and written every 0.2 s (and at the end)."""

    def __init__(self, path: str, parent: int) -> None:
        self.lines: list[Record] = []
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.parent = parent

    def flush(self) -> None:
        lines = list(self.lines)
        self.lines.clear()  # the same list: callers append to it
        self.file.write("".join(json.dumps(r, allow_nan=True) + "\n" for r in lines))
        self.file.flush()

    async def run(self) -> None:
        """Flush every 0.2 s; exit when the campaign process is gone (no orphans)."""
        while True:
            self.flush()
            if os.getppid() != self.parent:
                os._exit(3)
            await asyncio.sleep(0.2)

    def close(self) -> None:
        self.flush()
        self.file.close()


async def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as file:
        spec = json.load(file)
    records = Records(spec["records"], int(spec["parent"]))
    flusher = asyncio.ensure_future(records.run())
    dedup = Dedup(spec["url"], namespace=spec["namespace"], **spec["config"])
    await dedup.start()
    records.lines.append(["ready", dedup.instance_id, os.getpid()])
    print("ready", dedup.instance_id, flush=True)
    caller = Caller(dedup, spec, records.lines)
    watcher = asyncio.ensure_future(caller.watch())
    for n, wave in enumerate(spec["waves"]):
        wave["n"] = n
    await asyncio.gather(*[caller.wave(wave) for wave in spec["waves"]])
    await asyncio.sleep(float(spec.get("linger", 0.0)))
    watcher.cancel()
    records.lines.append(["done", len(caller.pending)])
    await caller.aclose()
    await dedup.aclose()
    records.lines.append(["end", dedup.stats()])
    flusher.cancel()
    records.close()


if __name__ == "__main__":
    asyncio.run(main())
