"""redis+sentinel:// — one master, one replica, one sentinel; calls survive a failover."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from dedupcall import Dedup, DedupError
from dedupcall.embedded import EmbeddedServer, EngineInfo, free_port


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.05)


def replicas_known(port: int) -> bool:
    with redis.Redis(port=port) as sentinel:
        try:
            return bool(sentinel.execute_command("SENTINEL", "REPLICAS", "mymaster"))
        except redis.RedisError:
            return False


@pytest.fixture
def sentinel_set(
    make_redis_server: Callable[..., EmbeddedServer], redis_engine: EngineInfo, tmp_path: Path
) -> Iterator[tuple[EmbeddedServer, EmbeddedServer, int]]:
    master = make_redis_server(extra_args=["--repl-diskless-sync-delay", "0"])
    replica = make_redis_server(extra_args=["--replicaof", "127.0.0.1", str(master.port)])
    with redis.Redis(port=replica.port) as r:
        until(lambda: r.info("replication").get("master_link_status") == "up", 10, "replication")
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    proc = subprocess.Popen(
        [redis_engine.path, str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        until(lambda: replicas_known(port), 20, "sentinel seeing the replica")
        yield master, replica, port
    finally:
        proc.kill()
        proc.wait(10)


async def test_calls_through_sentinel_survive_a_failover(
    sentinel_set: tuple[EmbeddedServer, EmbeddedServer, int],
    make_dedup: Callable[..., Dedup],
) -> None:
    master, replica, port = sentinel_set
    url = f"redis+sentinel://127.0.0.1:{port}/mymaster/0"
    a = make_dedup(url=url, socket_timeout=1.0, lock_timeout=2.0)
    b = make_dedup(url=url, socket_timeout=1.0, lock_timeout=2.0)
    runs = 0

    async def value() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return "v"

    assert await asyncio.gather(a.call("/s", value), b.call("/s", value)) == ["v", "v"]
    assert runs == 1

    master.kill()  # the sentinel promotes the replica within a few seconds
    deadline = time.monotonic() + 20
    while True:  # until the new master answers; every failure meanwhile is typed
        try:
            assert await a.call("/after", value, timeout=5) == "v"
            break
        except DedupError:
            assert time.monotonic() < deadline, "no failover within 20 s"
            await asyncio.sleep(0.2)
    with redis.Redis(port=replica.port) as promoted:
        assert promoted.info("replication")["role"] == "master"
    assert await b.call("/after", value, timeout=5) == "v"  # b found the new master too
