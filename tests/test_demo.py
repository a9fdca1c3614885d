"""``dedupcall demo`` (small sizes): its numbers add up, it finds a Redis the way the README
says, and it leaves no process or key behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest
import redis

from dedupcall.embedded import EmbeddedServer
from runs import assert_namespace_removed, no_redis_env, run_python

SMALL = ["--instances", "3", "--calls", "40", "--keys", "4", "--delay", "0.05"]


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "dedupcall", "demo", *args, env=env)


def demo_processes() -> list[int]:
    """Pids of demo instance processes still running (there must be none after a run)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if b"dedupcall.demo.instance" in file.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_demo_table_adds_up(redis_url: str) -> None:
    out = demo(*SMALL, "--url", redis_url)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout
    rows = {
        name: re.search(rf"{name}[^│]*│\s*([\d.]+)\s*│\s*([\d.]+)", table)
        for name in ("calls made", "upstream executions", "calls saved", "dedup ratio")
    }
    assert all(rows.values()), table
    values = {name: m.groups() for name, m in rows.items() if m}
    assert values["calls made"] == ("120", "120")
    assert values["upstream executions"] == ("4", "120")  # one per key; without: every call
    assert values["calls saved"] == ("116", "0")
    assert values["dedup ratio"] == ("30.0", "1.0")
    counts = {
        name: int(m.group(1))
        for name in ("executed", "joined", "cached", "no dedup")
        if (m := re.search(rf"│ {name}\s*│\s*(\d+)", table))
    }
    assert counts["executed"] == 4 and counts["no dedup"] == 120, table
    assert counts["executed"] + counts["joined"] + counts["cached"] == 120, table
    assert "OK: 4 upstream executions for 4 distinct keys" in table
    assert "without" in table and "━" in table  # the progress bars
    assert_namespace_removed(redis_url, table)
    assert demo_processes() == []


def test_demo_json_summary_is_consistent(redis_url: str) -> None:
    out = demo(*SMALL, "--url", redis_url, "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)  # only the summary is on stdout
    w, wo = result["with_dedup"], result["without_dedup"]
    assert result["calls_made"] == 120 and result["ok"] is True
    assert w["upstream_executions"] == result["keys"] == 4
    assert w["calls_saved"] == 116 and wo["upstream_executions"] == 120
    assert sum(w["latency"][k]["count"] for k in ("executed", "joined", "cached")) == 120
    assert w["latency"]["executed"]["count"] == 4
    assert wo["latency"]["direct"]["count"] == 120
    # Callers of a 50 ms upstream waited at least that long; cache hits did not.
    assert w["latency"]["joined"]["p50_ms"] >= 50
    assert w["latency"]["cached"]["p50_ms"] < w["latency"]["joined"]["p50_ms"]
    assert "cleanup: deleted" in out.stderr


def test_demo_uses_a_local_server_when_one_answers(redis_server: EmbeddedServer) -> None:
    env = no_redis_env(DEDUPCALL_LOCAL_REDIS=f"127.0.0.1:{redis_server.port}")
    out = demo(*SMALL, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Redis: redis://127.0.0.1:{redis_server.port}/0 (found running locally)" in out.stdout
    assert_namespace_removed(redis_server.url, out.stdout)


def test_demo_starts_and_stops_an_embedded_server_when_there_is_no_redis() -> None:
    out = demo("--instances", "2", "--calls", "10", "--keys", "2", "--delay", "0.02",
               env=no_redis_env())  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    started = re.search(r"Redis: embedded \S+ at (redis://\S+)", out.stdout)
    assert started, out.stdout
    assert "OK: 2 upstream executions for 2 distinct keys" in out.stdout
    client = redis.Redis.from_url(started.group(1), socket_connect_timeout=1)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()  # stopped with the demo
    finally:
        client.close()
    assert demo_processes() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instances", "0"], "--instances must be an integer in 1..64"),
        (["--delay", "-1"], "--delay must be within 0..30 seconds"),
        (["--url", "http://nope"], "Redis URL must start with"),
        (["--calls", "many"], "'many' is not a valid integer"),
    ],
)
def test_demo_rejects_bad_options_with_exit_code_2(args: list[str], message: str) -> None:
    out = demo(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_demo_against_an_unreachable_redis_fails_cleanly(redis_server: EmbeddedServer) -> None:
    from dedupcall.embedded import free_port

    out = demo(*SMALL, "--url", f"redis://127.0.0.1:{free_port()}/0")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "cannot reach" in out.stderr and "Traceback" not in out.stderr
    assert demo_processes() == []
