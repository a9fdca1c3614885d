"""Redis loses its data (a restart without persistence, an operator's FLUSHDB): shared
config and the instance registry come back as the instances last saw them, limits hold,
calls right after a restart succeed, and fencing tokens never repeat."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
import redis.asyncio as aioredis

from dedup_fixtures import lose_data
from dedupcall import Config, Dedup
from dedupcall.codec import key_digest
from dedupcall.config import encode_shared
from dedupcall.embedded import EmbeddedServer
from dedupcall.keys import KeySpace
from dedupcall.models import Grant
from dedupcall.store import Store
from procs import Spawner
from upstream import Upstream

FAULTY = {"socket_timeout": 1.0, "lock_timeout": 1.0, "poll_interval": 0.3}


@pytest.mark.parametrize("how", ["restart", "flushdb"])
async def test_limits_hold_after_redis_loses_its_data(
    how: str,
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    spawn: Spawner,
    namespace: str,
    upstream: Upstream,
) -> None:
    server = make_redis_server()
    # Both instances were built with max_concurrent=5; an operator lowered it to 1.
    here = make_dedup(url=server.url, max_concurrent=5, **FAULTY)
    await here.start()
    spec = {
        "url": server.url,
        "namespace": namespace,
        "upstream": upstream.url,
        "mode": "worker",
        "config": {"max_concurrent": 5, "heartbeat_interval": 0.2, **FAULTY},
    }
    worker = spawn("caller.py", json.dumps(spec))
    worker.wait_line('"max_concurrent": 5')
    await here.update_config(max_concurrent=1)
    worker.wait_line('"max_concurrent": 1')

    await lose_data(server, how)
    ids = [
        await here.add_get_request(f"/loss/{i}", f"{upstream.url}/loss/{i}?delay=0.1")
        for i in range(6)
    ]
    results = [await here.wait_for_result(rid, timeout=15) for rid in ids]
    assert all(r.success for r in results), [r.error for r in results]
    assert upstream.peak() == 1  # the operator's limit, not a default or a constructor's
    status = await here.get_queue_status()
    assert status.config["max_concurrent"] == 1
    stored = aioredis.Redis.from_url(server.url)
    assert await stored.hget(KeySpace(namespace).config, "max_concurrent") == b"1"
    # the registry is back too: both instances are alive again
    for _ in range(100):
        if len((await here.get_queue_status()).instances) == 2:
            break
        await asyncio.sleep(0.05)
    assert len((await here.get_queue_status()).instances) == 2
    await stored.aclose()


async def test_calls_right_after_a_restart_get_fresh_connections(
    make_redis_server: Callable[..., EmbeddedServer], make_dedup: Callable[..., Dedup]
) -> None:
    server = make_redis_server()
    dedup = make_dedup(url=server.url, **FAULTY)

    async def value(i: int) -> int:
        await asyncio.sleep(0.05)
        return i

    # many concurrent calls: the pool holds many connections, which the restart closes
    warm = [dedup.call(f"/warm/{i}", lambda i=i: value(i)) for i in range(40)]
    assert await asyncio.gather(*warm) == list(range(40))
    server.kill()
    server.restart()
    for _ in range(200):  # the subscriber reconnected: Redis is back for everyone
        if dedup.stats()["reconnects"] >= 1:
            break
        await asyncio.sleep(0.02)
    after = [dedup.call(f"/after/{i}", lambda i=i: value(i)) for i in range(20)]
    assert await asyncio.gather(*after) == list(range(20))


async def test_fencing_tokens_never_repeat_when_the_counter_rolls_back(
    redis_url: str, namespace: str
) -> None:
    # A bare store, with no worker of its own to take the grants first.
    config = Config(**FAULTY)
    store = Store(redis_url, KeySpace(namespace), "tester", config)
    await store.init(encode_shared(config.shared()), b"{}")
    digest = key_digest("function", "/fenced")
    first = await store.submit(
        kind="function",
        key="/fenced",
        digest=digest,
        rid="same-id",
        priority=0,
        ttl_ms=-1,
        cache_failures=False,
        fingerprint="",
        credentials="",
        on_conflict="join",
        payload=b"",
        may_grant=True,
    )
    assert first[0] == b"granted"
    stale = Grant("same-id", first[2].decode(), 1, 1000, "function", digest)
    # The epoch counter rolls back (a failover to a replica that missed it, a restore),
    # then the flight is granted again: its new token must differ from the stale one.
    await store.redis.set(store.keys.prefix + "epoch", 0)
    released = await store.release(stale, drop=False)
    assert released[0] == b"released"
    regrant = Grant.from_reply(released[1][0])
    assert regrant.request_id == "same-id" and regrant.epoch == stale.epoch
    assert regrant.token != stale.token
    # the stale executor's completion, under the old token, is refused
    reply = await store.complete(stale, b'{"ok":true,"data":"stale"}', True)
    assert reply[0] == b"lost"
    await store.close()


@pytest.mark.parametrize("how", ["restart", "flushdb"])
async def test_a_run_in_progress_is_re_established_not_repeated(
    how: str,
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    spawn: Spawner,
    namespace: str,
    upstream: Upstream,
) -> None:
    server = make_redis_server()
    config = {"max_concurrent": 1, "heartbeat_interval": 0.2, "lock_timeout": 1.5}
    here = make_dedup(url=server.url, **{**FAULTY, **config})
    await here.start()
    spec = {
        "url": server.url,
        "namespace": namespace,
        "upstream": upstream.url,
        "config": {**FAULTY, **config},
        "keys": ["/alive"],
        "delay": 2.0,
        "timeout": 30,
    }
    child = spawn("caller.py", json.dumps(spec))  # runs /alive for 2 s
    while upstream.hits("/value/alive") == 0:
        await asyncio.sleep(0.01)
    ran_here = 0

    async def same() -> str:
        nonlocal ran_here
        ran_here += 1
        return "ran twice"

    joined = asyncio.create_task(here.call("/alive", same, timeout=30))
    await asyncio.sleep(0.2)
    await lose_data(server, how)  # Redis forgets the flight, its lease and the limit

    async with httpx.AsyncClient() as client:

        async def second() -> int:
            response = await client.get(f"{upstream.url}/value/second")
            return int(response.json()["hit"])

        # The run in progress is re-established: waiters join it, nothing runs twice,
        # and the limit of 1 holds for a call made right after the loss.
        assert await here.call("/second", second, timeout=30) == 1
        value = await joined
    out = child.json(timeout=30)
    assert ran_here == 0 and upstream.hits("/value/alive") == 1
    assert out["results"]["/alive"] == [value]
    assert upstream.peak() == 1
