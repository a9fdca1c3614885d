"""The tests' TCP fault proxy (tests/faultproxy.py) itself, in front of a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from dedupcall.lostwrite import guard_writes, lost_in_transport
from faultproxy import FaultProxy


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", urlsplit(redis_url).port or 6379) as proxy:
        yield proxy


@pytest.fixture
async def client(proxy: FaultProxy) -> AsyncIterator[aioredis.Redis]:
    """A client through the proxy that does not retry, so every fault is seen; its writes
    are guarded as dedupcall's are (dedupcall.lostwrite: CPython 3.12/3.13 releases raise
    AttributeError for a write to a reset connection)."""
    client = aioredis.Redis(port=proxy.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    pool = client.connection_pool
    pool.connection_class = guard_writes(pool.connection_class)
    yield client
    await client.aclose()


async def test_passes_bytes_through_and_counts_them(
    proxy: FaultProxy, client: aioredis.Redis
) -> None:
    value = b"\x00\xff" * 50_000
    await client.set("fp:big", value)
    assert await client.get("fp:big") == value
    assert proxy.accepted == 1 and proxy.open_connections == 1
    assert proxy.sent["up"] > 100_000 and proxy.sent["down"] > 100_000


async def test_latency_delays_each_way(proxy: FaultProxy, client: aioredis.Redis) -> None:
    await client.ping()
    proxy.latency(0.1)
    start = time.monotonic()
    await client.ping()
    assert 0.2 <= time.monotonic() - start < 1.0
    proxy.latency(0)
    start = time.monotonic()
    await client.ping()
    assert time.monotonic() - start < 0.1


async def test_freeze_holds_bytes_on_an_open_connection_until_thaw(
    proxy: FaultProxy, client: aioredis.Redis
) -> None:
    await client.ping()
    proxy.freeze("down")
    ping = asyncio.ensure_future(client.ping())
    await asyncio.sleep(0.3)
    assert not ping.done() and proxy.open_connections == 1
    proxy.thaw()
    assert await asyncio.wait_for(ping, 1) is True


async def test_reset_all_is_a_connection_error_then_the_client_reconnects(
    proxy: FaultProxy, client: aioredis.Redis
) -> None:
    await client.ping()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    while proxy.open_connections < 2:
        await asyncio.sleep(0.01)
    proxy.reset_all()
    with pytest.raises(ConnectionResetError):  # an RST, not a clean close
        await reader.read()
    writer.close()
    with pytest.raises(redis.ConnectionError):
        await client.ping()
    assert await client.ping() is True
    assert proxy.accepted == 3


async def test_drop_all_closes_cleanly(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PING\r\n")
    assert await reader.readline() == b"+PONG\r\n"
    proxy.drop_all()
    assert await reader.read() == b""  # a FIN
    writer.close()


async def test_down_refuses_new_connections_and_up_listens_again(
    proxy: FaultProxy, client: aioredis.Redis
) -> None:
    proxy.down()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    with pytest.raises(redis.ConnectionError):
        await client.ping()
    proxy.up()
    assert await client.ping() is True


async def test_limit_data_cuts_a_reply_midway(proxy: FaultProxy, client: aioredis.Redis) -> None:
    value = b"v" * 200_000
    await client.set("fp:cut", value)
    proxy.limit_data(1000)
    with pytest.raises(redis.ConnectionError):
        await client.get("fp:cut")  # never a truncated value
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET fp:cut\r\n")
    assert len(await reader.read()) == 1000  # then a clean close
    writer.close()
    proxy.limit_data(None)
    assert await client.get("fp:cut") == value


def test_runs_on_a_thread_for_sync_code(redis_url: str) -> None:
    with FaultProxy("127.0.0.1", urlsplit(redis_url).port or 6379) as proxy:
        client = redis.Redis(port=proxy.port, socket_timeout=0.3, retry=SyncRetry(NoBackoff(), 0))
        assert client.ping() is True
        proxy.freeze()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        proxy.heal()
        assert client.ping() is True
        client.close()
    assert not any(t.name == "faultproxy" for t in threading.enumerate())


def test_only_asyncios_transport_failing_counts_as_a_lost_write() -> None:
    # Our own AttributeError (a bug) must never pass for a lost connection.
    try:
        getattr(None, "missing")  # noqa: B009
    except AttributeError as exc:
        assert not lost_in_transport(exc)
    assert not lost_in_transport(AttributeError("no traceback"))
    assert not lost_in_transport(ValueError("not the kind"))
