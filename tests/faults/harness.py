"""The fault campaigns' driver and oracle.

``Campaign`` owns what one scenario starts: a Redis server on a free port, the counting
upstream (tests/upstream.py), child instances (tests/procs.py running ``instance.py``), a
fault proxy when asked, and a work folder; leaving it stops them all, also on Ctrl-C.
``Run`` is one run of a scenario in a fresh namespace: it starts children with waves of
calls, injects faults (counted in ``faults``), and ``judge()`` turns the children's record
files and the upstream's counters into ``Figures``:

- extra: upstream executions beyond one per key (result_ttl outlives a run, so each key
  has one result window); ``allowed`` is what the scenario's faults may cost by contract
- lost: callers that got neither a result nor a typed error, or a wrong result (a body
  not made by an execution of their key, a torn payload, or callers of one flight that
  got different executions)
- hung: callers still waiting past their deadline (timeout + grace), or never answered
- spurious: typed errors the contract rules out: ``FlightDropped`` for a caller that was
  still waiting, ``NoHolder`` in a run where no process died or froze
- split: flights whose callers got bodies of different attempts (each attempt's callers
  agree), e.g. an executor that could not store its result answers its own callers
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from instance import decode_key, load_key, upstream_path

from dedupcall import Observer, QueueItem
from dedupcall.embedded import EmbeddedServer
from faultproxy import FaultProxy
from procs import Proc, Spawner
from upstream import Upstream

CHILD = Path(__file__).resolve().with_name("instance.py")
# Short leases and fast sweeps: recovery takes seconds. result_ttl outlives every run.
FAST: dict[str, Any] = {
    "lock_timeout": 1.5,
    "heartbeat_interval": 0.2,
    "poll_interval": 0.5,
    "retry_delay": 0.05,
    "socket_timeout": 1.0,
    "drain_timeout": 1.0,
    "execution_timeout": 10.0,
    "result_ttl": 600.0,
    "max_concurrent": 100,
}


@dataclass
class Figures:
    """What a scenario measured, summed over its runs."""

    runs: int = 0
    faults: int = 0
    calls: int = 0
    extra: int = 0
    allowed: int = 0
    lost: int = 0
    hung: int = 0
    typed: int = 0
    split: int = 0  # flights whose callers got different attempts' bodies (see README)
    spurious: int = 0  # typed errors the contract rules out here (see _check)
    waits: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def add(self, other: Figures) -> None:
        for counter in (f.name for f in fields(self) if f.type == "int"):  # str annotations
            setattr(self, counter, getattr(self, counter) + getattr(other, counter))
        self.waits += other.waits
        self.errors.update(other.errors)
        self.violations += other.violations

    @property
    def p99(self) -> float | None:
        if len(self.waits) < 2:
            return self.waits[0] if self.waits else None
        return statistics.quantiles(self.waits, n=100, method="inclusive")[98]

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self, scenario: str, seconds: float) -> dict[str, Any]:
        p99 = self.p99
        return {
            "scenario": scenario,
            "runs": self.runs,
            "faults": self.faults,
            "calls": self.calls,
            "extra_executions": self.extra,
            "allowed_extra": self.allowed,
            "lost": self.lost,
            "hung": self.hung,
            "typed_errors": self.typed,
            "split_flights": self.split,
            "spurious_errors": self.spurious,
            "p99_wait_s": None if p99 is None else round(p99, 3),
            "seconds": round(seconds, 1),
            "verdict": "pass" if self.ok else "FAIL",
            "errors": dict(self.errors.most_common(8)),
            "violations": self.violations[:20],
        }


@dataclass
class Child:
    """One child instance: its process, spec and record file."""

    name: str
    proc: Proc
    spec: dict[str, Any]
    records: Path
    instance_id: str = ""
    killed: bool = False

    def read(self) -> list[list[Any]]:
        if not self.records.exists():
            return []
        with self.records.open(encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.endswith("\n")]

    def key(self, wave: int, index: int) -> Any:
        spec = self.spec["waves"][wave]
        if "load" in spec:
            return load_key(spec["load"]["prefix"], index, spec["load"]["hot"])
        return decode_key(spec["keys"][index])

    def ended(self) -> bool:
        return any(r[0] == "end" for r in self.read())


class Campaign:
    """The server, upstream, proxy and children of one scenario; all stopped on exit."""

    def __init__(
        self, setup: Callable[[Path], dict[str, Any]] | None = None, *, keep: bool = False
    ) -> None:
        """``setup(workdir)`` may return ``engine``, ``server_args``, ``persistence``
        (AOF) and ``proxy`` (children reach Redis through a ``FaultProxy``)."""
        self.workdir = Path(tempfile.mkdtemp(prefix="dedupcall-faults-"))
        try:
            options = setup(self.workdir) if setup else {}
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.server = EmbeddedServer(
            engine=options.get("engine"),
            extra_args=options.get("server_args", ()),
            persistence=options.get("persistence", False),
            dir=str(self.workdir / "redis"),
        )
        self.upstream = Upstream()
        self.spawner = Spawner()
        self.proxy: FaultProxy | None = None
        self._want_proxy, self.keep = bool(options.get("proxy")), keep
        self.runs = 0

    async def __aenter__(self) -> Campaign:
        try:
            self.upstream.start()
            await asyncio.to_thread(self.server.start)
            if self._want_proxy:
                self.proxy = await FaultProxy("127.0.0.1", self.server.port).start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            with (self.workdir / "children.log").open("w") as log, contextlib.redirect_stderr(log):
                self.spawner.close()  # kills every child group, prints their stderr
            if self.proxy is not None:
                await self.proxy.aclose()
        finally:
            self.server.stop()
            self.upstream.stop()
            if not self.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def url(self) -> str:
        """Where children connect: through the proxy when there is one."""
        return self.proxy.url() if self.proxy is not None else self.server.url

    def run(self, **config: Any) -> Run:
        self.runs += 1
        return Run(self, self.runs, {**FAST, **config})


class Run:
    """One run of a scenario, in a namespace of its own."""

    def __init__(self, campaign: Campaign, n: int, config: dict[str, Any]) -> None:
        self.campaign, self.n, self.config = campaign, n, config
        tag = uuid.uuid4().hex[:8]
        self.namespace, self.prefix = f"fc{n}x{tag}", f"/r{n}{tag}"
        self.children: list[Child] = []
        self.faults = self.allowed = self.deaths = 0
        self.exempt: set[Any] = set()  # keys whose flights a fault hit directly (corrupt)
        self.violations: list[str] = []
        self.calls: list[tuple[Child, Any, list[Any]]] = []  # (child, key, record)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def path(self, key: Any) -> str:
        return upstream_path(key)

    def hits(self, key: Any) -> int:
        return self.campaign.upstream.hits(upstream_path(key))

    def child(
        self,
        name: str,
        waves: list[dict[str, Any]],
        *,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        url: str | None = None,
        linger: float = 0.0,
    ) -> Child:
        """Start a child instance running ``waves`` (see instance.py)."""
        base = self.campaign.workdir / f"run{self.n}-{name}-{len(self.children)}"
        spec = {
            "url": url or self.campaign.url,
            "namespace": self.namespace,
            "upstream": self.campaign.upstream.url,
            "config": {**self.config, **(config or {})},
            "records": str(base.with_suffix(".jsonl")),
            "parent": os.getpid(),
            "waves": waves,
            "linger": linger,
        }
        base.with_suffix(".json").write_text(json.dumps(spec))
        proc = self.campaign.spawner(CHILD, base.with_suffix(".json"), env=env)
        child = Child(name, proc, spec, base.with_suffix(".jsonl"))
        self.children.append(child)
        return child

    async def started(self, *children: Child, timeout: float = 30.0) -> None:
        """Wait until each child's instance is up; learn its instance id."""
        for child in children or tuple(self.children):
            line = await asyncio.to_thread(child.proc.wait_line, "ready", timeout)
            child.instance_id = line.split()[1]

    def owner(self, instance_id: str | None) -> Child | None:
        return next((c for c in self.children if c.instance_id == instance_id), None)

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a child; SIGKILL and SIGSTOP count as faults (and deaths)."""
        if sig == signal.SIGKILL:
            child.killed = True
        self.deaths += sig in (signal.SIGKILL, signal.SIGSTOP)
        child.proc.kill(sig)
        self.faults += sig in (signal.SIGKILL, signal.SIGSTOP)

    async def items(self, url: str | None = None) -> list[QueueItem]:
        """Every unfinished flight, read through an ``Observer`` (directly, not proxied)."""
        async with Observer(url or self.campaign.server.url, self.namespace) as observer:
            return await observer.get_queue_items()

    async def running_on(self, child: Child) -> list[QueueItem]:
        return [
            i
            for i in await self.items()
            if i.state == "running" and i.executor == child.instance_id
        ]

    async def until(self, predicate: Any, timeout: float = 15.0, what: str = "") -> bool:
        """Poll ``predicate`` (sync or async) every 10 ms; False (and a violation) on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return True
            await asyncio.sleep(0.01)
        if what:
            self.violations.append(f"run {self.n}: {what} not seen within {timeout} s")
        return False

    async def finish(self, timeout: float = 30.0) -> None:
        """Wait for every child not killed to end; a child that does not is killed and
        its unanswered callers count as hung."""
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.killed:
                continue
            child.proc.kill(signal.SIGCONT)
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.to_thread(child.proc.wait, left)
            except TimeoutError:
                self.violations.append(f"run {self.n}: child {child.name} did not end in time")
                child.proc.kill(signal.SIGKILL)
                await asyncio.to_thread(child.proc.wait, 10)

    def judge(self) -> Figures:
        """The run's figures from the record files and the upstream's counters."""
        figs = Figures(runs=1, faults=self.faults, allowed=self.allowed)
        flights: dict[tuple[str, int], set[tuple[Any, Any]]] = defaultdict(set)
        paths: set[str] = set()
        for child in self.children:
            records = child.read()
            calls = [r for r in records if isinstance(r[0], int)]
            figs.hung += sum(1 for r in records if r[0] == "hung")
            expected = sum(
                len(w["keys"]) * int(w.get("callers", 1))
                for w in child.spec["waves"]
                if "keys" in w
            )
            if not child.killed and not child.ended():
                figs.hung += max(0, expected - len(calls))
                self.violations.append(f"run {self.n}: {child.name} never closed its instance")
            for wave in child.spec["waves"]:
                paths.update(upstream_path(decode_key(k)) for k in wave.get("keys", ()))
            for record in calls:
                key = child.key(record[0], record[1])
                self.calls.append((child, key, record))
                self._check(figs, child, key, record, flights)
        by_id: dict[str, set[Any]] = defaultdict(set)
        for (rid, attempts), seen in flights.items():
            by_id[rid] |= seen
            if len(seen) > 1:  # two executions handed out for one attempt: wrong
                figs.lost += len(seen) - 1
                figs.violations.append(f"run {self.n}: {rid} attempt {attempts}: {sorted(seen)}")
        figs.split += sum(1 for seen in by_id.values() if len(seen) > 1)
        # A failure is not cached: a caller after it opens a new flight, which runs again.
        rids: dict[Any, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for _, key, r in self.calls:
            if r[3] and r[2] in ("ok", "failed"):
                rids[key][r[2]].add(r[3])
        figs.allowed += sum(
            min(len(seen["failed"]), len(seen["failed"] | seen["ok"]) - 1) for seen in rids.values()
        )
        hits = self.campaign.upstream.stats()["hits"]
        paths.update(p for p in hits if p.startswith("/value" + self.prefix))
        figs.extra = sum(max(0, hits.get(p, 0) - 1) for p in paths)
        figs.violations += self.violations
        if figs.lost:
            figs.violations.append(f"run {self.n}: {figs.lost} lost or wrong results")
        if figs.spurious:
            figs.violations.append(
                f"run {self.n}: {figs.spurious} waiting callers got NoHolder or FlightDropped "
                "though no holder died and they had not left"
            )
        if figs.hung:
            figs.violations.append(f"run {self.n}: {figs.hung} callers hung past their deadline")
        if figs.extra > figs.allowed:
            figs.violations.append(
                f"run {self.n}: {figs.extra} extra executions, {figs.allowed} allowed"
            )
        return figs

    def _check(
        self,
        figs: Figures,
        child: Child,
        key: Any,
        record: list[Any],
        flights: dict[tuple[str, int], set[tuple[Any, Any]]],
    ) -> None:
        outcome, rid, attempts, path, hit, exec_id, wait, error = record[2:10]
        if outcome == "cancelled":
            return
        figs.calls += 1
        figs.waits.append(float(wait))
        if outcome in ("failed", "typed"):
            figs.typed += 1
            kind = str(error).split(":")[0]
            figs.errors[kind] += 1
            # Only a flight every waiter left is dropped, only one whose every holder
            # died fails NoHolder: this caller was waiting, and nobody died (if no deaths).
            if key not in self.exempt and (
                kind == "FlightDropped" or (kind == "NoHolder" and not self.deaths)
            ):
                figs.spurious += 1
            return
        want = upstream_path(key)
        problem = None
        if outcome != "ok":
            problem = f"{outcome} {error}"
        elif path != want:
            problem = f"body of {path!r} for a key served by {want!r}"
        elif not isinstance(hit, int) or not 1 <= hit <= self.campaign.upstream.hits(want):
            problem = f"hit {hit!r} is no execution of {want!r}"
        if problem is not None:
            figs.lost += 1
            if len(figs.violations) < 10:
                figs.violations.append(f"run {self.n}: {child.name}: {problem}")
            return
        if rid:
            flights[rid, attempts].add((hit, exec_id))
