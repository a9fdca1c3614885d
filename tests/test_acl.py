"""A Redis user restricted to the namespace's keys and channels is enough (no @dangerous)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis

from dedupcall import Dedup, RedisUnavailable
from dedupcall.embedded import EmbeddedServer
from upstream import Upstream


def add_user(server: EmbeddedServer, namespace: str, *, channels: bool) -> str:
    """Create user ``app`` limited to ``{namespace}:*``; returns a URL that logs in as it."""
    rules = ["on", ">s3cret:pw", f"~{{{namespace}}}:*", "+@all", "-@dangerous"]
    rules.append("resetchannels")  # Redis 6.2 starts a user with every channel allowed
    if channels:
        rules.append(f"&{{{namespace}}}:*")
    with redis.Redis.from_url(server.url) as admin:
        admin.acl_setuser("app", reset=True)
        admin.execute_command("ACL", "SETUSER", "app", *rules)
    return f"redis://app:s3cret%3Apw@127.0.0.1:{server.port}/0"


async def test_restricted_user_can_do_everything(
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    namespace: str,
    upstream: Upstream,
) -> None:
    server = make_redis_server()
    url = add_user(server, namespace, channels=True)
    a, b = make_dedup(url=url), make_dedup(url=url)

    async def fetch() -> int:
        await asyncio.sleep(0.05)
        return 42

    assert await asyncio.gather(a.call("/acl", fetch), b.call("/acl", fetch)) == [42, 42]
    rid = await a.add_get_request("/acl/req", f"{upstream.url}/value/acl")
    assert (await b.wait_for_result(rid, timeout=5)).success
    status = await a.get_queue_status()
    assert len(status.instances) == 2
    await a.update_config(max_retries=1)
    assert await a.clear_queue() == 0
    assert "s3cret" not in repr(a)


async def test_user_without_channel_access_fails_fast_with_a_typed_error(
    make_redis_server: Callable[..., EmbeddedServer],
    make_dedup: Callable[..., Dedup],
    namespace: str,
) -> None:
    server = make_redis_server()
    url = add_user(server, namespace, channels=False)
    dedup = make_dedup(url=url, socket_timeout=1.0)

    async def f() -> int:
        return 1

    with pytest.raises(RedisUnavailable):
        await asyncio.wait_for(dedup.call("/acl", f), 10)
