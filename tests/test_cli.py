"""Every ``dedupcall`` command against a real server, as a real process, error paths too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio

from dedup_fixtures import hold_slot
from dedupcall import Dedup, DedupError, Observer
from dedupcall.embedded import EmbeddedServer, free_port
from procs import Spawner
from runs import run_python
from upstream import Upstream


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m dedupcall args...`` in a clean environment (no REDIS_*/DEDUPCALL_*)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DEDUPCALL_"))}
    return run_python("-m", "dedupcall", *args, env={**base, **(env or {})}, stdin=stdin)


def ok_json(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


async def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``cli`` off the event loop, so the test's own Dedup keeps running meanwhile."""
    return await asyncio.to_thread(cli, *args, **kwargs)


async def test_status_shows_queue_instances_counters_and_config(
    make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup(max_concurrent=1)
    await dedup.start()
    await dedup.update_config(max_concurrent=1)
    await dedup.call("/done", lambda: asyncio.sleep(0, result=1))
    blocker = await hold_slot(dedup)
    waiting = asyncio.create_task(dedup.call("/waiting", lambda: asyncio.sleep(0, result=2)))
    while (await dedup.get_queue_status()).queue_length == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(dedup.config.heartbeat_interval * 2)  # its numbers reach its heartbeat
    body = ok_json(await run("status", "--json", "--url", redis_url, "--namespace", namespace))
    assert (body["queue_length"], body["running"], body["delayed"]) == (1, 1, 0)
    assert body["namespace"] == namespace
    [instance] = body["instances"]  # the CLI itself is not an instance
    assert instance["id"] == dedup.instance_id and instance["last_seen"] < 2
    assert instance["stats"]["executed"] == 1 and body["totals"]["executed"] == 1
    assert instance["wait_p50"] is not None
    assert body["config"]["max_concurrent"] == 1

    text = await run("status", "--url", redis_url, "-n", namespace, env={"COLUMNS": "160"})
    assert text.returncode == 0, text.stderr
    for shown in ("1 queued, 1 running, 0 delayed", "live instances (1)", "shared config"):
        assert shown in text.stdout
    assert dedup.instance_id in text.stdout

    items = ok_json(await run("items", "--json", "--url", redis_url, "--namespace", namespace))
    assert [(i["key"], i["state"]) for i in items] == [
        ("/blocker", "running"),
        ("/waiting", "queued"),
    ]
    assert items[0]["executor"] == dedup.instance_id and items[0]["attempts"] == 1
    assert items[1]["waiters"] == 1 and items[1]["age"] >= 0
    table = await run("items", "--url", redis_url, "--namespace", namespace, env={"COLUMNS": "160"})
    assert (
        "/waiting" in table.stdout
        and "queued" in table.stdout
        and "flights of namespace" in table.stdout
    )

    await blocker.release()
    assert await waiting == 2


async def test_clear_asks_first_and_removes_queued_flights(
    make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup()
    await dedup.start()
    await dedup.update_config(max_concurrent=1)
    blocker = await hold_slot(dedup)
    waiting = [
        asyncio.create_task(dedup.call(f"/q/{i}", lambda: asyncio.sleep(0, result=0)))
        for i in range(3)
    ]
    while (await dedup.get_queue_status()).queue_length < 3:
        await asyncio.sleep(0.01)
    target = ("--url", redis_url, "--namespace", namespace)

    declined = await run("clear", *target, stdin="n\n")
    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "Remove 3 queued/delayed flight(s)" in declined.stderr
    assert (await dedup.get_queue_status()).queue_length == 3  # nothing removed

    no_answer = await run("clear", *target)  # no terminal, no --yes: refuse, don't guess
    assert no_answer.returncode == 1
    assert (await dedup.get_queue_status()).queue_length == 3

    confirmed = await run("clear", *target, stdin="y\n")
    assert confirmed.returncode == 0 and "removed 3 flight(s)" in confirmed.stdout
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(type(r).__name__ == "QueueCleared" for r in results), results

    again = ok_json(await run("clear", "--yes", "--json", *target))
    assert again == {"removed": 0}
    await blocker.release()  # running flights are not cleared


def test_config_get_and_set_validate_and_change_every_instance(
    redis_url: str, namespace: str
) -> None:
    target = ("--url", redis_url, "--namespace", namespace)
    assert ok_json(cli("config", "get", "--json", *target))["max_retries"] == 3  # defaults
    changed = ok_json(cli("config", "set", "max_retries=5", "retry_delay=0.25", "--json", *target))
    assert (changed["max_retries"], changed["retry_delay"]) == (5, 0.25)
    assert ok_json(cli("config", "get", "max_retries", "--json", *target)) == {"max_retries": 5}
    unlimited = ok_json(cli("config", "set", "max_concurrent=none", "--json", *target))
    assert unlimited["max_concurrent"] is None

    for bad, message in [
        (["max_retries=x"], "max_retries='x' is not a valid max_retries"),
        (["max_retries=-1"], "max_retries must be an int in 0..1000"),
        (["lock_timeout=0.001"], "lock_timeout must be a number of seconds in 0.05..86400"),
        (["socket_timeout=1"], "'socket_timeout' is not a shared setting"),
        (["max_retries"], "expected NAME=VALUE"),
        (["max_retries=4", "retry_delay=oops"], "retry_delay='oops' is not a valid retry_delay"),
    ]:
        out = cli("config", "set", *bad, *target)
        assert out.returncode == 2, (bad, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr
    # One bad value changed nothing, not even the good one beside it.
    assert ok_json(cli("config", "get", "--json", *target))["max_retries"] == 5
    unknown = cli("config", "get", "nope", *target)
    assert unknown.returncode == 2 and "not shared config option(s): nope" in unknown.stderr


def test_environment_is_read_like_from_env(redis_server: EmbeddedServer, namespace: str) -> None:
    env = {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_server.port),
        "DEDUPCALL_NAMESPACE": namespace,
    }
    cli("config", "set", "max_retries=7", env=env)
    assert ok_json(cli("config", "get", "--json", env=env))["max_retries"] == 7
    explicit = ok_json(cli("config", "get", "--json", "--url", redis_server.url, "-n", namespace))
    assert explicit["max_retries"] == 7
    bad = cli("status", env={"DEDUPCALL_MAX_RETRIES": "lots", "REDIS_URL": redis_server.url})
    assert bad.returncode == 2 and "DEDUPCALL_MAX_RETRIES='lots'" in bad.stderr


@pytest.mark.parametrize("command", [["status"], ["items"], ["clear", "--yes"], ["config", "get"]])
def test_unreachable_redis_and_bad_urls_fail_with_distinct_codes(command: list[str]) -> None:
    down = cli(*command, "--url", f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 3, down.stdout + down.stderr
    assert down.stderr.startswith("error: cannot reach redis://127.0.0.1:")
    assert "Traceback" not in down.stderr

    as_json = cli(*command, "--json", "--url", f"redis://127.0.0.1:{free_port()}/0")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["error"] == "RedisUnavailable"

    bad = cli(*command, "--url", "http://localhost:6379")
    assert bad.returncode == 2 and "Redis URL must start with" in bad.stderr
    secret = cli(*command, "--url", "redis://:hunter2@127.0.0.1:1/0")
    assert secret.returncode == 3 and "hunter2" not in secret.stderr  # redacted

    usage = cli(*command, "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_help_and_version() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for command in ("status", "items", "clear", "config", "worker", "demo"):
        assert command in out.stdout
    assert "3 Redis unreachable" in " ".join(out.stdout.split())
    assert cli("--version").stdout.strip().endswith("0.1.0")
    assert cli("nope").returncode == 2


@pytest.mark.parametrize("signals", [1, 2])
async def test_worker_runs_queued_requests_and_drains_on_sigterm(
    spawn: Spawner,
    make_dedup: Callable[..., Dedup],
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    signals: int,
) -> None:
    worker = spawn.module(
        "dedupcall", "worker", "--json", "--url", redis_url, "--namespace", namespace,
        env={"DEDUPCALL_HEARTBEAT_INTERVAL": "0.2", "DEDUPCALL_LOCK_TIMEOUT": "2"},
    )  # fmt: skip
    await asyncio.to_thread(worker.wait_line, '"event": "ready"', 30, stderr=True)
    submitter = make_dedup()
    await submitter.start()
    await submitter.update_config(max_concurrent=1)
    # The submitter holds the only slot, queues a slow request, then leaves: the freed
    # slot can only go to the standalone worker.
    blocker = await hold_slot(submitter)
    rid = await submitter.add_get_request("/slow", f"{upstream.url}/slow?delay=0.6")
    assert (await submitter.get_flight(rid)).state == "queued"  # type: ignore[union-attr]
    closing = asyncio.create_task(submitter.aclose(drain_timeout=0.05))
    async with Observer(redis_url, namespace) as observer:  # not an instance: never granted
        while True:
            [item] = [i for i in await observer.get_queue_items() if i.request_id == rid]
            if item.state == "running":
                break
            await asyncio.sleep(0.01)
    assert item.executor is not None and item.executor.split(":")[1] == str(worker.pid)
    worker.kill(signal.SIGTERM)  # mid-request: it must finish it before exiting
    if signals == 2:  # ...unless told twice: then it stops at once, as 128 + SIGTERM
        await asyncio.to_thread(worker.wait_line, '"event": "stopping"', 30, stderr=True)
        worker.kill(signal.SIGTERM)
        code, _, stderr = await asyncio.to_thread(worker.wait, 30)
        assert code == 128 + signal.SIGTERM, stderr
        assert '"event": "killed"' in stderr and "Traceback" not in stderr
        await closing
        with pytest.raises(DedupError, match="stopped before it finished"):
            await blocker.task
        return
    code, _, stderr = await asyncio.to_thread(worker.wait, 30)
    assert code == 0, stderr
    result = await make_dedup().wait_for_result(rid, timeout=5)
    assert result.success and result.status_code == 200
    assert result.executed_by == item.executor
    assert upstream.hits("/slow") == 1
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    seen = [e.get("event") for e in events]
    # Drained: the request it was running finished after the signal, before the exit.
    assert seen == ["ready", "granted", "stopping", "executed", "stopped"]
    for event in ("granted", "executed"):
        record = next(e for e in events if e.get("event") == event)
        assert (record["request_id"], record["key"], record["attempt"]) == (rid, "/slow", 1)
        assert record["instance_id"] == item.executor
    await closing
    with pytest.raises(DedupError, match="stopped before it finished"):
        await blocker.task  # the submitter closed while its blocker ran


async def test_keys_are_shown_as_text_never_as_markup_or_escapes(
    make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup()
    await dedup.start()
    await dedup.update_config(max_concurrent=1)
    blocker = await hold_slot(dedup, key="/run[/bold]")  # unbalanced markup: once a crash
    nasty = "[red]RED[/red] \x1b[31mansi\x1b[0m"
    waiting = asyncio.create_task(dedup.call(nasty, lambda: asyncio.sleep(0, result=1)))
    while (await dedup.get_queue_status()).queue_length == 0:
        await asyncio.sleep(0.01)
    out = await run("items", "--url", redis_url, "-n", namespace, env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "/run[/bold]" in out.stdout
    assert "[red]RED[/red] \\x1b[31mansi\\x1b[0m" in out.stdout  # escaped, not interpreted
    assert "\x1b" not in out.stdout
    await blocker.release()
    assert await waiting == 1


async def test_redis_that_answers_but_refuses_is_not_unreachable(
    redis_url: str, namespace: str
) -> None:
    from dedupcall.keys import KeySpace

    client = redis.asyncio.Redis.from_url(redis_url)
    await client.set(KeySpace(namespace).queue, "not a sorted set")
    try:
        wrong_type = await run("status", "--url", redis_url, "-n", namespace)
    finally:
        await client.delete(KeySpace(namespace).queue)
        await client.aclose()
    assert wrong_type.returncode == 1, wrong_type.stderr
    assert "refused a command" in wrong_type.stderr and "WRONGTYPE" in wrong_type.stderr
    bad_login = redis_url.replace("redis://", "redis://bob:wrong@")
    denied = await run("status", "--url", bad_login)
    assert denied.returncode == 2 and "refused the credentials" in denied.stderr
    assert "wrong" not in denied.stderr  # the password is redacted


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:abc/0",
        "redis://127.0.0.1:6379/abc",
        "redis://127.0.0.1:6379/0?socket_timeout=abc",
        "redis://[::1",
    ],
)
def test_malformed_urls_are_usage_errors(url: str) -> None:
    for command in (["status"], ["demo"]):
        out = cli(*command, "--url", url)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "Redis URL" in out.stderr and "Traceback" not in out.stderr


def test_clear_without_an_answer_is_a_json_refusal_with_json(
    redis_url: str, namespace: str
) -> None:
    out = cli("clear", "--json", "--url", redis_url, "-n", namespace)  # stdin: empty
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"error": "Aborted", "message": "aborted"}


def test_max_concurrent_is_lifted_only_by_an_explicit_none(redis_url: str, namespace: str) -> None:
    target = ("--url", redis_url, "-n", namespace)
    for text in ("max_concurrent=0", "max_concurrent="):
        out = cli("config", "set", text, *target)
        assert out.returncode == 2, (text, out.stderr)
    assert ok_json(cli("config", "get", "--json", *target))["max_concurrent"] == 100
    assert (
        ok_json(cli("config", "set", "max_concurrent=None", "--json", *target))["max_concurrent"]
        is None
    )
