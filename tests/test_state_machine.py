"""The scripts as a state machine (hypothesis, stateful) against a real Redis: random
interleavings of submit, complete, retry, release, leave, lease expiry, reap, an instance
dying, retiring or coming back, and config changes, across three simulated instances,
never break the invariants:

- at most one lease per flight: a flight runs under one token, and only its holder
  of that token can complete it;
- no grant beyond ``max_concurrent``;
- grants in priority order: nothing is granted while a more urgent flight that could
  run now stays queued;
- after a sweep, every queued flight has someone able to run it;
- no key without an owner or a TTL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dedupcall.codec import key_digest
from dedupcall.config import Config, encode_shared
from dedupcall.embedded import EmbeddedServer
from dedupcall.keys import KeySpace
from dedupcall.models import Grant
from dedupcall.store import Store

INSTANCES = ("i0", "i1", "i2")
KEYS = ("/a", "/b", "/c", "/d")
CONFIG = Config(lock_timeout=60.0, heartbeat_interval=1.0, retry_delay=0.0, max_concurrent=2)
STRUCTURES = ("config", "queue", "delayed", "running", "instances", "seq", "epoch")


@dataclass
class Held:
    """A grant one simulated instance holds."""

    instance: str
    grant: Grant


class Scripts(RuleBasedStateMachine):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.keys = KeySpace("sm" + uuid.uuid4().hex[:10])
        self.raw = aioredis.Redis.from_url(url)
        seed = (encode_shared(CONFIG.shared()), b"{}")
        self.stores = {i: Store(url, self.keys, i, CONFIG, seed=lambda: seed) for i in INSTANCES}
        self.alive = set(INSTANCES)
        self.held: dict[str, Held] = {}  # request id -> the grant its executor holds
        self.max_concurrent = 2
        self.submitted = 0  # request ids in order: hypothesis replays draw the same ones
        for store in self.stores.values():
            self.run(store.init(encode_shared(CONFIG.shared()), b"{}"))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        async def close() -> None:
            names = [k async for k in self.raw.scan_iter(match=self.keys.prefix + "*")]
            if names:
                await self.raw.delete(*names)
            await self.raw.aclose()
            for store in self.stores.values():
                await store.close()

        self.run(close())
        self.loop.close()

    # --- reading the state ------------------------------------------------------------
    def zset(self, name: str) -> dict[str, float]:
        pairs = self.run(self.raw.zrange(name, 0, -1, withscores=True))
        return {m.decode(): s for m, s in pairs}

    def flight(self, rid: str) -> dict[str, str]:
        raw = self.run(self.raw.hgetall(self.keys.flight(rid)))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def take(self, instance: str, grants: list[Any]) -> list[str]:
        """Record grants handed to ``instance``; returns their ids."""
        ids = []
        for reply in grants:
            grant = Grant.from_reply(reply)
            self.held[grant.request_id] = Held(instance, grant)
            ids.append(grant.request_id)
        return ids

    def granted(self, before: dict[str, float], after: dict[str, float]) -> None:
        """What a step granted respects the limit and the priorities of what waits."""
        new = set(after) - set(before)
        if not new:
            return
        assert len(after) <= self.max_concurrent, (len(after), self.max_concurrent)
        queued = self.zset(self.keys.queue)
        live = {i for i, s in self.zset(self.keys.instances).items() if s > self.now()}
        waiting = [
            int(self.flight(rid).get("prio", 0)) for rid in queued if self.runnable(rid, live)
        ]
        for rid in new:
            prio = int(self.flight(rid).get("prio", 0))
            assert all(prio >= p for p in waiting), (prio, waiting)

    def runnable(self, rid: str, live: set[str]) -> bool:
        f = self.flight(rid)
        if f.get("kind") == "request":
            return bool(live)
        holders = {h.decode() for h in self.run(self.raw.smembers(self.keys.holders(rid)))}
        return bool(holders & live)

    def now(self) -> int:
        seconds, micros = self.run(self.raw.time())
        return int(seconds) * 1000 + int(micros) // 1000

    # --- rules ------------------------------------------------------------------------
    @rule(
        instance=st.sampled_from(INSTANCES),
        key=st.sampled_from(KEYS),
        kind=st.sampled_from(["function", "request"]),
        priority=st.integers(-2, 2),
    )
    def submit(self, instance: str, key: str, kind: str, priority: int) -> None:
        if instance not in self.alive:
            return
        store, running = self.stores[instance], self.zset(self.keys.running)
        self.submitted += 1
        rid = f"r{self.submitted:04d}"
        reply = self.run(
            store.submit(
                kind=kind,
                key=key,
                digest=key_digest(kind, key),
                rid=rid,
                priority=priority,
                ttl_ms=-1,
                cache_failures=False,
                fingerprint="",
                credentials="",
                on_conflict="join",
                payload=b'{"method":"GET","url":"http://127.0.0.1:1/","headers":{}}',
                may_grant=True,
            )
        )
        verdict = reply[0].decode()
        if verdict == "granted":
            self.take(instance, [[reply[1], *reply[2:5], kind, key_digest(kind, key)]])
        elif verdict == "queued":
            self.take(instance, reply[2])
        self.granted(running, self.zset(self.keys.running))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), ok=st.booleans())
    def complete(self, data: st.DataObject, ok: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.held)))
        held = self.held.pop(rid)
        owned = self.flight(rid).get("token") == held.grant.token
        running = self.zset(self.keys.running)
        reply = self.run(self.stores[held.instance].complete(held.grant, b'{"ok":true}', ok))
        assert (reply[0] == b"ok") == owned  # only the current token completes
        if reply[0] == b"ok":
            self.take(held.instance, reply[1])
        self.granted(running, self.zset(self.keys.running))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.held)))
        held = self.held.pop(rid)
        running = self.zset(self.keys.running)
        reply = self.run(self.stores[held.instance].retry(held.grant, b'{"ok":false}', 0))
        if reply[0] in (b"retrying", b"failed"):
            self.take(held.instance, reply[-1])
        self.granted(running, self.zset(self.keys.running))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), drop=st.booleans())
    def release(self, data: st.DataObject, drop: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.held)))
        held = self.held.pop(rid)
        running = self.zset(self.keys.running)
        reply = self.run(self.stores[held.instance].release(held.grant, drop=drop))
        if reply[0] == b"released":
            self.take(held.instance, reply[1])
        self.granted(running, self.zset(self.keys.running))

    @rule(instance=st.sampled_from(INSTANCES), data=st.data())
    def leave(self, instance: str, data: st.DataObject) -> None:
        held = self.run(self.raw.smembers(self.keys.held(instance)))
        if instance in self.alive and held:
            rid = data.draw(st.sampled_from(sorted(h.decode() for h in held)))
            self.run(self.stores[instance].leave(rid))

    @precondition(lambda self: self.zset(self.keys.running))
    @rule(data=st.data())
    def expire_lease(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.zset(self.keys.running))))
        self.run(self.raw.zadd(self.keys.running, {rid: 1}))  # its lease ran out

    @rule(instance=st.sampled_from(INSTANCES))
    def reap(self, instance: str) -> None:
        if instance not in self.alive:
            return
        running = self.zset(self.keys.running)
        reply = self.run(self.stores[instance].reap(b"{}", False, True))
        self.take(instance, reply[0])
        self.granted(running, self.zset(self.keys.running))
        self.someone_can_run_every_queued_flight()

    @rule(instance=st.sampled_from(INSTANCES))
    def die(self, instance: str) -> None:
        """The instance stops answering: its heartbeat is in the past, its grants lost."""
        self.alive.discard(instance)
        self.run(self.raw.zadd(self.keys.instances, {instance: 1}))
        for rid in [r for r, h in self.held.items() if h.instance == instance]:
            del self.held[rid]

    @rule(instance=st.sampled_from(INSTANCES))
    def retire(self, instance: str) -> None:
        if instance in self.alive:
            self.alive.discard(instance)
            self.run(self.stores[instance].retire())
            for rid in [r for r, h in self.held.items() if h.instance == instance]:
                del self.held[rid]

    @rule(instance=st.sampled_from(INSTANCES))
    def come_back(self, instance: str) -> None:
        self.alive.add(instance)
        self.run(self.stores[instance].init(encode_shared(CONFIG.shared()), b"{}"))

    @rule(max_concurrent=st.integers(1, 3), max_retries=st.integers(0, 2))
    def change_config(self, max_concurrent: int, max_retries: int) -> None:
        values = {"max_concurrent": max_concurrent, "max_retries": max_retries}
        self.run(self.stores["i0"].write_shared_config(encode_shared(values)))
        self.max_concurrent = max_concurrent

    # --- invariants -------------------------------------------------------------------
    def someone_can_run_every_queued_flight(self) -> None:
        live = {i for i, s in self.zset(self.keys.instances).items() if s > self.now()}
        for rid in self.zset(self.keys.queue):
            f = self.flight(rid)
            if f.get("kind") != "request":  # requests wait for a worker until a deadline
                assert self.runnable(rid, live), (rid, f)

    @invariant()
    def one_lease_per_flight(self) -> None:
        # Every running flight has one token and one executor; a grant we hold under its
        # current token was made to that executor (stale grants only fail to complete).
        for rid in self.zset(self.keys.running):
            f = self.flight(rid)
            assert f.get("state") == "running" and f.get("token") and f.get("exec"), (rid, f)
            held = self.held.get(rid)
            if held is not None and held.grant.token == f["token"]:
                assert held.instance == f["exec"], (rid, f, held)

    @invariant()
    def every_key_has_an_owner_or_a_ttl(self) -> None:
        k = self.keys
        sets = {
            "queued": self.zset(k.queue),
            "delayed": self.zset(k.delayed),
            "running": self.zset(k.running),
        }
        instances = self.zset(k.instances)

        async def scan() -> list[tuple[str, int]]:
            names = [n.decode() async for n in self.raw.scan_iter(match=k.prefix + "*")]
            ttls = [await self.raw.pttl(n) for n in names]
            return list(zip(names, ttls, strict=True))

        for name, ttl in self.run(scan()):
            part = name.removeprefix(k.prefix)
            kind, _, rest = part.partition(":")
            if part in STRUCTURES or ttl > 0:
                continue
            if kind == "f":
                state = self.flight(rest).get("state", "")
                assert rest in sets.get(state, {}), (name, state)
                assert sum(rest in s for s in sets.values()) == 1, name
            elif kind == "h":
                assert self.run(self.raw.exists(k.flight(rest))), name
            elif kind == "k":
                rid = self.run(self.raw.get(name)).decode()
                assert self.run(self.raw.exists(k.flight(rid))), name
            elif kind == "held":
                assert rest in instances, name
            else:
                raise AssertionError(f"{name} has no owner and no TTL")


def test_scripts_keep_their_invariants(make_redis_server: Callable[..., EmbeddedServer]) -> None:
    # A server of its own: the invariants scan the whole keyspace after every step.
    url = make_redis_server().url
    run_state_machine_as_test(
        lambda: Scripts(url),
        settings=settings(
            max_examples=50,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
