"""What ``dedupcall demo`` runs: several service instances, one slow upstream, one call per key.

Starts a local upstream that counts its hits, then N instance processes
(``dedupcall.demo.instance``) that fire concurrent duplicate GETs through
``AsyncDedupTransport``; then the same workload without dedup. Reports what reached the
upstream and how long callers waited, by how they got their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from dedupcall.config import redact
from dedupcall.demo.local import NoRedis, namespace, redis_url
from dedupcall.demo.upstream import Upstream
from dedupcall.errors import ConfigError, DedupError, RedisUnavailable
from dedupcall.observer import Observer

OUTCOMES = ("executed", "joined", "cached")
START_TIMEOUT = 30.0  # seconds for every instance to connect
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class DemoOptions:
    """What ``dedupcall demo`` runs: ``instances`` processes, each making ``calls`` calls
    over ``keys`` distinct paths of an upstream that takes ``delay`` seconds."""

    instances: int = 4
    calls: int = 200
    keys: int = 5
    delay: float = 0.2
    url: str | None = None

    def __post_init__(self) -> None:
        for name, low, high in (("instances", 1, 64), ("calls", 1, 10_000), ("keys", 1, 10_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"--{name} must be an integer in {low}..{high}, got {value!r}")
        if not 0 <= self.delay <= 30:
            raise ConfigError(f"--delay must be within 0..30 seconds, got {self.delay!r}")


@dataclass
class RunResult:
    """One pass of the workload: upstream hits, wall time, callers' latencies by outcome."""

    hits: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    stats: list[dict[str, Any]] = field(default_factory=list)


async def _child(spec: dict[str, Any]) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dedupcall.demo.instance",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode() + b"\n")  # not in argv: ps shows argv
    await proc.stdin.drain()
    return proc


async def _message(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        code = await proc.wait()
        raise DedupError(f"a demo instance exited early (exit code {code}); see its output above")
    message: dict[str, Any] = json.loads(line)
    return message


async def run_pass(
    spec: dict[str, Any], instances: int, on_progress: Callable[[int], None], upstream: Upstream
) -> RunResult:
    """Start the instances, start them firing together, collect what they measured."""
    upstream.hits.clear()
    procs = await asyncio.gather(*(_child(spec) for _ in range(instances)))
    try:
        await asyncio.gather(*(_message(p, START_TIMEOUT) for p in procs))  # all ready
        start = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        done = [0] * instances
        result = RunResult(hits=0, seconds=0.0)

        async def follow(i: int, proc: asyncio.subprocess.Process) -> None:
            while True:
                message = await _message(proc, RUN_TIMEOUT)
                if "done" in message:
                    done[i] = message["done"]
                    on_progress(sum(done))
                elif "latencies" in message:
                    for outcome, values in message["latencies"].items():
                        result.latencies.setdefault(outcome, []).extend(values)
                    result.stats.append(message.get("stats", {}))
                    return

        await asyncio.gather(*(follow(i, p) for i, p in enumerate(procs)))
        result.seconds = time.perf_counter() - start
        result.hits = upstream.total()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
        return result
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def run(
    opts: DemoOptions, console: Console, url: str, ns: str, up: Upstream
) -> dict[str, Any]:
    """Both passes, with a progress bar; returns the summary (see ``summary``)."""
    keys = [f"/api/users/{i}" for i in range(opts.keys)]
    total = opts.instances * opts.calls
    spec = {"redis": url, "namespace": ns, "upstream": up.url, "keys": keys, "calls": opts.calls}
    columns = (
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    passes = []
    with Progress(*columns, console=console, transient=False) as progress:
        for label, dedup in (("with dedupcall", True), ("without", False)):
            task = progress.add_task(label, total=total)

            def advance(n: int, task: TaskID = task) -> None:
                progress.update(task, completed=n)

            passes.append(await run_pass({**spec, "dedup": dedup}, opts.instances, advance, up))
    with_dedup, without = passes
    return summary(opts, with_dedup, without)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values`` in milliseconds; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))  # the smallest value with q of them at or below
    return ordered[rank - 1] * 1000


def summary(opts: DemoOptions, with_dedup: RunResult, without: RunResult) -> dict[str, Any]:
    """The demo's numbers as JSON-ready data (what ``--json`` prints and the table shows)."""
    total = opts.instances * opts.calls

    def latency(values: list[float]) -> dict[str, Any]:
        return {
            "count": len(values),
            "p50_ms": percentile(values, 0.5),
            "p99_ms": percentile(values, 0.99),
        }

    return {
        "instances": opts.instances,
        "calls_per_instance": opts.calls,
        "keys": opts.keys,
        "delay_s": opts.delay,
        "calls_made": total,
        "with_dedup": {
            "upstream_executions": with_dedup.hits,
            "calls_saved": total - with_dedup.hits,
            "dedup_ratio": total / max(1, with_dedup.hits),
            "seconds": with_dedup.seconds,
            "latency": {k: latency(with_dedup.latencies.get(k, [])) for k in OUTCOMES},
        },
        "without_dedup": {
            "upstream_executions": without.hits,
            "calls_saved": total - without.hits,
            "dedup_ratio": total / max(1, without.hits),
            "seconds": without.seconds,
            "latency": {"direct": latency(without.latencies.get("direct", []))},
        },
        # Fewer calls per instance than keys call only that many of them.
        "keys_called": min(opts.keys, opts.calls),
        "ok": with_dedup.hits == min(opts.keys, opts.calls),
    }


def headline(result: dict[str, Any]) -> str:
    return (
        f"{result['instances']} instances x {result['calls_per_instance']} calls over "
        f"{result['keys']} keys (upstream takes {result['delay_s'] * 1000:.0f} ms)"
    )


def table(result: dict[str, Any]) -> tuple[Table, Table]:
    """The comparison table and the latency table of a ``summary``."""
    w, wo = result["with_dedup"], result["without_dedup"]
    compare = Table()
    compare.add_column("")
    compare.add_column("with dedupcall", justify="right")
    compare.add_column("without", justify="right")
    compare.add_row("calls made", str(result["calls_made"]), str(result["calls_made"]))
    compare.add_row(
        "upstream executions", str(w["upstream_executions"]), str(wo["upstream_executions"])
    )
    compare.add_row("calls saved", str(w["calls_saved"]), str(wo["calls_saved"]))
    compare.add_row(
        "dedup ratio (calls/exec)", f"{w['dedup_ratio']:.1f}", f"{wo['dedup_ratio']:.1f}"
    )
    compare.add_row("wall time (s)", f"{w['seconds']:.2f}", f"{wo['seconds']:.2f}")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    latency = Table(title="latency per call (ms)")
    for name, justify in (("", "left"), ("count", "right"), ("p50", "right"), ("p99", "right")):
        latency.add_column(name, justify=justify)  # type: ignore[arg-type]
    rows = [(k, w["latency"][k]) for k in OUTCOMES] + [("no dedup", wo["latency"]["direct"])]
    for name, lat in rows:
        latency.add_row(name, str(lat["count"]), ms(lat["p50_ms"]), ms(lat["p99_ms"]))
    return compare, latency


def main(opts: DemoOptions, *, as_json: bool = False) -> int:
    """Run the demo; 0 when the upstream ran once per key, 1 when not (or it failed), 2
    when it could not run (no Redis, a bad URL), 3 when Redis is unreachable, 130 when
    interrupted (Ctrl-C, SIGTERM: every process it started is stopped, its keys deleted).
    With ``as_json``, only the summary (or the error) goes to stdout, as JSON."""
    out = Console(stderr=as_json, highlight=False, soft_wrap=True)
    where = "Redis"

    def say(text: str) -> None:
        out.print(text, markup=False)

    def failed(code: int, kind: str, message: str) -> int:
        if as_json:
            print(json.dumps({"error": kind, "message": message}))
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[red]demo failed:[/] {escape(message)}"
        )
        return code

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Upstream(opts.delay) as up, redis_url(opts.url, say) as url:
            where = redact(url)
            asyncio.run(_reachable(url))
            with namespace(url, "demo", say) as ns:
                say(f"upstream: {up.url} ({opts.delay * 1000:.0f} ms per call); namespace {ns}")
                result = asyncio.run(run(opts, out, url, ns, up))
                report(result, out, as_json)
    except (NoRedis, ConfigError) as exc:
        return failed(2, type(exc).__name__, str(exc))
    except RedisUnavailable as exc:
        return failed(3, "RedisUnavailable", f"cannot reach {where}: {exc}")
    except DedupError as exc:
        return failed(1, type(exc).__name__, str(exc))
    except KeyboardInterrupt:
        return failed(130, "Interrupted", "interrupted; stopped its processes")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if result["ok"] else 1


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so every context above stops what it started.
    raise KeyboardInterrupt


async def _reachable(url: str) -> None:
    async with Observer(url, "demo") as observer:
        await observer.get_queue_status()


def report(result: dict[str, Any], out: Console, as_json: bool) -> None:
    """Print the summary: as JSON on stdout, or as tables and a closing verdict."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print("\n" + headline(result), markup=False)
    for part in table(result):
        out.print(part)
    hits = result["with_dedup"]["upstream_executions"]
    word = "[green]OK[/]" if result["ok"] else "[red]UNEXPECTED[/]"
    out.print(f"{word}: {hits} upstream executions for {result['keys_called']} distinct keys")
