"""``dedupcall demo`` (small sizes): its numbers add up, it finds a Redis the way the README
says, and it leaves no process or key behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from dedupcall.embedded import EmbeddedServer
from procs import REPO_ROOT
from runs import assert_namespace_removed, cmdline, no_redis_env, run_python

SMALL = ["--instances", "3", "--calls", "40", "--keys", "4", "--delay", "0.05"]


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "dedupcall", "demo", *args, env=env)


def demo_processes() -> list[int]:
    """Pids of demo instance processes still running (there must be none after a run)."""
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return [pid for pid in pids if "dedupcall.demo.instance" in cmdline(pid)]


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
    started = re.search(
        r"Redis: embedded, a private (?:Redis|Valkey) \S+ server \(\S+\) at (redis://\S+)",
        out.stdout,
    )
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


def test_fewer_calls_than_keys_is_still_one_execution_per_key_called(redis_url: str) -> None:
    out = demo("--instances", "2", "--calls", "2", "--keys", "5", "--delay", "0.02",
               "--url", redis_url, "--json")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["keys_called"] == 2 and result["with_dedup"]["upstream_executions"] == 2


def test_percentiles_are_nearest_rank() -> None:
    from dedupcall.demo.runner import percentile

    assert percentile([0.001, 0.002, 0.003, 0.004], 0.5) == 2.0
    assert percentile([i / 1000 for i in range(1, 101)], 0.99) == 99.0
    assert percentile([0.005], 0.99) == 5.0 and percentile([], 0.5) is None


def test_sigterm_stops_every_process_and_deletes_the_namespace(
    redis_server: EmbeddedServer,
) -> None:
    # Logged in with a password: it must not show on any process's command line (ps).
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.execute_command("ACL", "SETUSER", "demo", "on", ">s3cret-pw", "~*", "&*", "+@all")
    url = f"redis://demo:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    argv = [sys.executable, "-m", "dedupcall", "demo", "--instances", "3", "--calls", "20",
            "--keys", "2", "--delay", "30", "--url", url]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(instances := demo_processes()) < 3:  # every instance is up and calling
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert not any("s3cret" in cmdline(pid) for pid in instances)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        with redis.Redis.from_url(redis_server.url) as admin:
            admin.execute_command("ACL", "DELUSER", "demo")
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert demo_processes() == []
    assert_namespace_removed(redis_server.url, stdout)
