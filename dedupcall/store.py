"""Store: the Redis side of one instance. Its clients, its scripts, one method per
state transition, and the few plain reads. Every Redis error leaves here as
``RedisUnavailable``; nothing above this module builds a key or sends a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from dedupcall.batch import Batcher
from dedupcall.config import SHARED_FIELDS, Config, SentinelTarget, parse_sentinel_url
from dedupcall.errors import DedupError, RedisUnavailable, SerializationError
from dedupcall.keys import KeySpace
from dedupcall.lostwrite import guard_writes
from dedupcall.models import Grant, Restore
from dedupcall.scripts import Scripts

Reply = list[Any]
#: What a ``Store`` re-seeds after Redis lost its data: (encoded shared config, info).
Seed = Callable[[], tuple[dict[str, str], bytes]]

log = logging.getLogger("dedupcall")


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Map every client-side Redis failure to ``RedisUnavailable`` (chained)."""
    try:
        yield
    except RedisError as exc:
        raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:  # distinct on Python 3.10
        raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool (follows failovers to the new master) that waits for a
    free connection instead of failing with "Too many connections"."""


def _sentinel(url: str, config: Config) -> tuple[Sentinel, SentinelTarget]:
    target = parse_sentinel_url(url)
    timeout = config.socket_timeout
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        sentinel_kwargs={
            "password": target.sentinel_password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        },
    )
    return manager, target


def shared_values(values: Sequence[Any]) -> dict[str, bytes]:
    """The shared config as the scripts return it (values in ``SHARED_FIELDS`` order)."""
    return dict(zip(SHARED_FIELDS, values, strict=True))


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _encoded(arg: Any) -> Any:
    if isinstance(arg, str):
        try:
            return arg.encode()
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"text sent to Redis must be valid Unicode; {arg[:80]!r} is not: {exc}"
            ) from None
    return arg


class Store:
    """Redis connections and transitions of one instance (``instance_id``) in one namespace.

    Three pools: the main one for calls; a small control one for lease renewal and sweeps,
    so they never queue behind large transfers; and the subscriber's.
    """

    def __init__(
        self,
        url: str,
        keys: KeySpace,
        instance_id: str,
        config: Config,
        seed: Seed | None = None,
    ) -> None:
        self.keys = keys
        self.instance_id = instance_id
        self.config = config
        # What to re-seed when a script finds the shared config gone or malformed (Redis
        # lost its data): the last shared config this instance saw, and its heartbeat info.
        # An observer has none: it reports the problem instead of guessing values.
        self._seed = seed
        self._repairing: asyncio.Future[None] | None = None
        self._pause_watch: asyncio.Future[None] | None = None
        self._nonce = f"{secrets.token_hex(4)}-"
        self._unreachable = False  # a call found Redis unreachable; none got through since
        self._calls = itertools.count()
        self._sentinel = _sentinel(url, config) if "+sentinel://" in url else None
        self.redis = self._client(url, config.max_connections)
        self.control = self._client(url, 2)
        # Lease renewal has a connection of its own: it never waits behind a sweep, a
        # release or a large transfer, and is never torn down and rebuilt between renewals.
        self.renewer = self._client(url, 1, single=True)
        self.subscriber = self._client(url, 2)
        self.lone = self._client(url, 1, single=True)
        self.scripts = Scripts(self.redis)
        # Batches take the pool, but leave room for a status read beside them.
        self.batcher = Batcher(
            self.redis, lone=self.lone, max_inflight=max(1, config.max_connections - 1)
        )

    def _client(self, url: str, size: int, *, single: bool = False) -> aioredis.Redis:
        """A client on its own pool of ``size``; ``single``: one dedicated connection
        (no pool round per command: the lone-command fast path)."""
        timeout = self.config.socket_timeout
        options: dict[str, Any] = {
            "max_connections": size,
            "timeout": timeout,  # waiting for a free connection: a typed error, never a hang
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # we retry where it is safe, not blindly
            # A new connection is ready after its TCP handshake (and AUTH, with a
            # password): no HELLO, CLIENT SETINFO or maintenance-notification round trips,
            # which cost a renewal seconds on a slow link.
            "protocol": 2,
            "driver_info": None,
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        pool: aioredis.BlockingConnectionPool
        if self._sentinel is not None:
            manager, target = self._sentinel
            sentinel_options = {
                **manager.connection_kwargs,
                **options,
                "db": target.db,
                "ssl": target.tls,
                "username": target.username,
                "password": target.password,
            }
            pool = BlockingSentinelPool(target.service, manager, **sentinel_options)  # type: ignore[no-untyped-call]
        else:
            pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        pool.connection_class = guard_writes(pool.connection_class)
        return aioredis.Redis(connection_pool=pool, single_connection_client=single)

    async def close(self) -> None:
        sentinels = self._sentinel[0].sentinels if self._sentinel is not None else []
        clients = (self.redis, self.lone, self.control, self.renewer, self.subscriber)
        for client in (*clients, *sentinels):
            with contextlib.suppress(Exception):
                await client.aclose()
                await client.connection_pool.disconnect()

    def hb_ms(self) -> int:
        """How long a heartbeat keeps this instance alive."""
        return int(max(3 * self.config.heartbeat_interval, 1.0) * 1000)

    async def _run(
        self,
        name: str,
        keys: list[str],
        args: list[Any],
        control: bool = False,
        client: aioredis.Redis | None = None,
    ) -> Any:
        # Encoded here, one command at a time: text that cannot be encoded is this
        # caller's error, never a failed batch for its neighbours.
        args = [self.keys.prefix, self.instance_id, self._nonce + f"{next(self._calls):x}"] + [
            _encoded(arg) for arg in args
        ]
        if control:
            client = self.control
        if self._unreachable and self._seed is not None and name != "recover":
            # Back after Redis was unreachable (a restart, a failover?): it may have lost
            # flights that still run. Before anything else is granted, pause grants while
            # their executors re-establish them.
            self._unreachable = False
            with contextlib.suppress(DedupError):
                await self.recover()
        for attempt in (1, 2):
            try:
                with redis_errors():
                    if client is not None:
                        reply = await self.scripts.run(name, keys, args, client=client)
                    else:
                        reply = await self.scripts.run_batched(name, keys, args, self.batcher)
            except RedisUnavailable as exc:
                if isinstance(exc.__cause__, (ConnectionError, OSError)):
                    self._unreachable = True  # not even a fresh connection got through
                raise
            if reply != b"noconfig":
                return reply
            if attempt == 1:
                await self.repair()
        raise RedisUnavailable(f"the shared config in Redis could not be re-established ({name})")

    async def recover(self, *, start: bool = True) -> float:
        """A flight vanished without a result: Redis lost data. Pause grants while the
        executors re-establish what they run (``start``; else only report a pause under
        way); returns the seconds the pause may still last (0: none). It ends sooner, once
        every live instance has answered."""
        return int(await self._run("recover", [self.keys.config], [int(start)])) / 1000

    async def until_recovered(self, *, start: bool = True, limit: float | None = None) -> bool:
        """``recover``, then wait (at most ``limit`` seconds) until grants resume; returns
        whether they were paused. Concurrent waiters share one watcher, so a thousand
        callers of vanished flights look at Redis twenty times a second, not 20,000."""
        pause = await self.recover(start=start)
        if pause <= 0:
            return False
        if self._pause_watch is None or self._pause_watch.done():
            self._pause_watch = asyncio.ensure_future(self._watch_pause(pause))
        with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError too, from 3.11
            await asyncio.wait_for(asyncio.shield(self._pause_watch), limit)
        return True

    async def _watch_pause(self, pause: float) -> None:
        while pause > 0:
            await asyncio.sleep(min(pause, 0.05))
            try:
                pause = await self.recover(start=False)
            except DedupError:
                return  # Redis went away again: the callers' own waits take over

    async def repair(self) -> None:
        """Re-seed the shared config where Redis lost it (or holds a malformed value) and
        register this instance again; concurrent callers share one repair."""
        if self._seed is None:
            raise DedupError(
                f"the shared config of namespace {self.keys.namespace!r} is missing or "
                "malformed in Redis; an instance restores it on its next call, or set it "
                "with update_config / `dedupcall config set`"
            )
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.ensure_future(self._repair(self._seed))
        await asyncio.shield(self._repairing)

    async def _repair(self, seed: Seed) -> None:
        shared, info = seed()
        log.warning(
            "dedupcall found the shared config missing or malformed in Redis (a restart "
            "without persistence, a failover, FLUSHDB?); restoring the last one seen",
            extra={"instance_id": self.instance_id},
        )
        await self._init(shared, info, recover=True)

    # --- transitions (lua/*.lua) ----------------------------------------------------
    async def init(self, shared: dict[str, str], info: bytes) -> dict[str, bytes]:
        """Load the scripts, seed shared config where unset, register as alive; returns
        the shared config Redis holds."""
        with redis_errors():
            await self.scripts.load(self.redis)
        return await self._init(shared, info)

    async def _init(
        self, shared: dict[str, str], info: bytes, *, recover: bool = False
    ) -> dict[str, bytes]:
        k, args = self.keys, [self.hb_ms(), info, int(recover)]
        for name, value in shared.items():
            args += [name, value]
        keys = [k.config, k.instances, k.instance_info(self.instance_id)]
        # Not through _run: a 'noconfig' here is final (the values given were refused).
        args = [self.keys.prefix, self.instance_id, "init"] + [_encoded(a) for a in args]
        with redis_errors():
            reply = await self.scripts.run_batched("init", keys, args, self.batcher)
        if reply == b"noconfig":
            raise RedisUnavailable("Redis refused the shared config")
        return shared_values(reply)

    async def submit(
        self,
        *,
        kind: str,
        key: str,
        digest: str,
        rid: str,
        priority: int,
        ttl_ms: int,
        cache_failures: bool,
        fingerprint: str,
        credentials: str,
        on_conflict: str,
        payload: bytes,
        may_grant: bool,
        fresh: bool = False,
    ) -> Reply:
        k = self.keys
        keys = [
            k.cache(digest),
            k.active(digest),
            k.flight(rid),
            k.holders(rid),
            k.held(self.instance_id),
            k.seq,
            k.queue,
            k.running,
            k.config,
        ]
        args = [
            kind,
            digest,
            key,
            rid,
            priority,
            ttl_ms,
            int(cache_failures),
            fingerprint,
            credentials,
            on_conflict,
            payload,
            int(may_grant),
            int(fresh),
        ]
        return list(await self._run("submit", keys, args))

    async def complete(
        self, grant: Grant, record: bytes, ok: bool, cache_ms: int = -1, keep_ms: int = -1
    ) -> Reply:
        """Store the final result: it answers later callers for the flight's ttl, capped
        at ``cache_ms`` (-1: no cap, 0: never) and can be fetched by id for ``keep_ms``
        (-1: the shared retention)."""
        k, rid = self.keys, grant.request_id
        keys = [k.flight(rid), k.result(rid), k.queue, k.running, k.config]
        args = [rid, grant.token, record, int(ok), cache_ms, keep_ms]
        return list(await self._run("complete", keys, args))

    async def retry(self, grant: Grant, final_record: bytes, retry_after_ms: int) -> Reply:
        k, rid = self.keys, grant.request_id
        keys = [k.flight(rid), k.result(rid), k.queue, k.delayed, k.running, k.config]
        args = [rid, grant.token, final_record, random.random(), retry_after_ms]
        return list(await self._run("retry", keys, args))

    async def release(self, grant: Grant, *, drop: bool) -> Reply:
        k, rid = self.keys, grant.request_id
        keys = [k.flight(rid), k.held(self.instance_id), k.queue, k.running, k.config]
        return list(await self._run("release", keys, [rid, grant.token, int(drop)], control=True))

    async def leave(self, rid: str) -> None:
        k = self.keys
        keys = [k.flight(rid), k.holders(rid), k.held(self.instance_id), k.queue, k.instances]
        await self._run("leave", keys, [rid])

    async def renew(self, grants: list[Grant]) -> tuple[int, set[str], set[str]]:
        """Extend leases; returns the lease length, the ids whose lease is lost (another
        executor has them, or they ended) and those Redis forgot (it lost data)."""
        args: list[Any] = []
        for grant in grants:
            args += [grant.request_id, grant.token]
        lease_ms, lost, gone = await self._run(
            "renew",
            [self.keys.running, self.keys.config, self.keys.recovered],
            args,
            client=self.renewer,
        )
        return int(lease_ms), {x.decode() for x in lost}, {x.decode() for x in gone}

    async def reclaim(self, flights: list[Restore]) -> set[str]:
        """Re-establish running flights Redis forgot; returns those it could not (another
        run owns their key now)."""
        args: list[Any] = []
        for r in flights:
            args += [
                r.grant.request_id,
                r.grant.token,
                r.grant.kind,
                r.grant.digest,
                r.key,
                r.grant.attempts,
                r.priority,
                r.ttl_ms,
                int(r.cache_failures),
                r.fingerprint,
                r.credentials,
                r.payload,
            ]
        k = self.keys
        keys = [k.running, k.config, k.held(self.instance_id), k.recovered]
        lost = await self._run("reclaim", keys, args, client=self.renewer)
        return {x.decode() for x in lost}

    async def reap(self, info: bytes, want_mine: bool, steady: bool) -> Reply:
        k = self.keys
        keys = [
            k.queue,
            k.delayed,
            k.running,
            k.instances,
            k.config,
            k.instance_info(self.instance_id),
        ]
        args = [self.hb_ms(), info, int(want_mine), int(steady)]
        return list(await self._run("reap", keys, args, True))

    async def retire(self) -> None:
        k = self.keys
        keys = [
            k.instances,
            k.held(self.instance_id),
            k.instance_info(self.instance_id),
            k.queue,
            k.running,
        ]
        await self._run("retire", keys, [], control=True)

    async def clear_batch(self, batch: int) -> int:
        k = self.keys
        return int(await self._run("clear", [k.queue, k.delayed, k.running], [batch]))

    # --- plain reads and writes -------------------------------------------------------
    async def pipeline(
        self,
        build: Callable[[Pipeline], object],
        *,
        transaction: bool = False,
        raise_on_error: bool = True,
    ) -> list[Any]:
        """Send what ``build(pipe)`` queues as one pipeline; its replies. Sent once more on
        a fresh connection when the server had closed the pooled one (every pipeline sent
        here is safe to repeat). Redis errors leave as ``RedisUnavailable``; with
        ``raise_on_error=False``, a command's own error (WRONGTYPE) is its reply."""

        async def send() -> list[Any]:
            pipe = self.redis.pipeline(transaction=transaction)
            build(pipe)
            return list(await pipe.execute(raise_on_error=raise_on_error))

        with redis_errors():
            try:
                return await send()
            except ConnectionError:
                await self.redis.connection_pool.disconnect(inuse_connections=False)
                return await send()

    async def read_result(self, rid: str, *, check_flight: bool) -> tuple[bytes | None, bool]:
        """The stored result of ``rid`` and whether its flight still exists. After a push
        the result is there: one GET. Otherwise (a safety poll) GET and EXISTS together."""
        if not check_flight:
            with redis_errors():
                found = await self.batcher.execute("GET", self.keys.result(rid))
            if isinstance(found, bytes):
                return found, True
        # MULTI: a completion between the two reads must not look like a lost flight.
        raw, exists = await self.pipeline(
            lambda p: (p.get(self.keys.result(rid)), p.exists(self.keys.flight(rid))),
            transaction=True,
            raise_on_error=False,
        )
        if isinstance(exists, Exception):
            raise RedisUnavailable(f"{type(exists).__name__}: {exists}")
        return (raw if isinstance(raw, bytes) else None), bool(exists)

    async def flight_payload(self, grant: Grant) -> tuple[Restore, bytes | None]:
        """A queued request's readable key and payload, with what would re-establish it
        (payload None when its record is not a readable hash: the attempt fails it as
        malformed)."""
        fields = ["key", "payload", "prio", "ttl", "cf", "fp", "cred"]
        (found,) = await self.pipeline(
            lambda p: p.hmget(self.keys.flight(grant.request_id), fields), raise_on_error=False
        )
        if not isinstance(found, list):
            return Restore(grant, ""), None
        key, _, prio, ttl, cf, fp, cred = (
            v.decode("utf-8", "replace") if isinstance(v, bytes) else "" for v in found
        )
        restore = Restore(
            grant,
            key,
            priority=_int(prio),
            ttl_ms=_int(ttl, -1),
            cache_failures=cf == "1",
            fingerprint=fp,
            credentials=cred,
            payload=found[1] if isinstance(found[1], bytes) else b"",
        )
        return restore, found[1] if isinstance(found[1], bytes) else None

    async def evict(self, digest: str) -> None:
        """Drop the cached answer of a key (it cannot be read)."""
        with redis_errors():
            await self.batcher.execute("DEL", self.keys.cache(digest))

    async def shared_config(self) -> dict[str, bytes]:
        """The shared config hash as Redis holds it (fields not yet checked; empty when it
        is not a hash at all)."""
        (raw,) = await self.pipeline(lambda p: p.hgetall(self.keys.config), raise_on_error=False)
        if not isinstance(raw, dict):
            return {}
        return {
            k.decode("utf-8", "replace"): v
            for k, v in raw.items()
            if isinstance(k, bytes) and isinstance(v, bytes)
        }

    async def write_shared_config(self, fields: dict[str, str]) -> None:
        """Write shared config and tell every instance, in one transaction."""

        def build(pipe: Pipeline) -> None:
            pipe.hset(self.keys.config, mapping=dict(fields))  # type: ignore[arg-type]
            pipe.publish(self.keys.control_channel, "config")

        await self.pipeline(build, transaction=True)
