"""Queued HTTP requests (the original system's API): dedup, retries, priority, queue tools."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from dedup_fixtures import hold_slot
from dedupcall import (
    CallFailed,
    ConfigError,
    ConflictError,
    Dedup,
    QueueCleared,
    UnknownRequest,
    WaitTimeout,
)
from upstream import Upstream


async def test_get_request_runs_once_and_duplicates_join(dedup: Dedup, upstream: Upstream) -> None:
    url = f"{upstream.url}/value/users/1?delay=0.1"
    ids = await asyncio.gather(*[dedup.add_get_request("/api/users/1", url) for _ in range(20)])
    assert len(set(ids)) == 1
    result = await dedup.wait_for_result(ids[0], timeout=5)
    assert result.success and result.status_code == 200
    assert result.data["path"] == "/value/users/1"
    assert (result.api_path, result.attempts, result.kind) == ("/api/users/1", 1, "request")
    assert upstream.hits("/value/users/1") == 1
    # later: the cached success answers, by the same request id, with no new hit
    again = await dedup.add_get_request("/api/users/1", url)
    assert again == ids[0]
    assert (await dedup.wait_for_result(again)).cached
    assert upstream.hits("/value/users/1") == 1


async def test_post_body_and_headers_reach_upstream_and_are_not_kept(
    dedup: Dedup, upstream: Upstream
) -> None:
    rid = await dedup.add_post_request(
        "/api/echo",
        f"{upstream.url}/echo",
        {"name": "Ann"},
        headers={"X-Token": "secret-value"},
        priority=2,
    )
    result = await dedup.wait_for_result(rid, timeout=5)
    assert result.success
    assert result.data["method"] == "POST"
    assert '"name"' in result.data["body"] and "Ann" in result.data["body"]
    assert await dedup.store.redis.exists(dedup.keys.flight(rid)) == 0  # payload deleted
    # the result holds the response only, never the request's headers
    rid = await dedup.add_get_request(
        "/api/v", f"{upstream.url}/value/v", headers={"X-Token": "secret-value"}
    )
    assert (await dedup.wait_for_result(rid, timeout=5)).success
    assert b"secret-value" not in await dedup.store.redis.get(dedup.keys.result(rid))


async def test_put_and_delete(dedup: Dedup, upstream: Upstream) -> None:
    put = await dedup.add_put_request("/api/u/2", f"{upstream.url}/echo", b"\x00raw")
    delete = await dedup.add_delete_request("/api/u/3", f"{upstream.url}/echo")
    r_put, r_del = await dedup.wait_for_result(put, 5), await dedup.wait_for_result(delete, 5)
    assert (r_put.data["method"], r_del.data["method"]) == ("PUT", "DELETE")


async def test_5xx_retried_with_backoff_then_success(dedup: Dedup, upstream: Upstream) -> None:
    upstream.script("/flaky/1", [503, 503, 200])
    rid = await dedup.add_get_request("/flaky/1", f"{upstream.url}/flaky/1")
    result = await dedup.wait_for_result(rid, timeout=10)
    assert result.success and result.attempts == 3
    assert upstream.hits("/flaky/1") == 3


async def test_exhausted_retries_fail_every_waiter_with_last_status(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_retries=2)
    await dedup.start()
    other = make_dedup()
    upstream.script("/down", [503])
    rid = await dedup.add_get_request("/down", f"{upstream.url}/down")
    results = await asyncio.gather(
        dedup.wait_for_result(rid, 10),
        dedup.wait_for_result(rid, 10),
        other.wait_for_result(rid, 10),
    )
    for result in results:
        assert not result.success
        assert (result.status_code, result.attempts) == (503, 3)
        assert result.error_type == "HTTPStatusError"
    assert upstream.hits("/down") == 3


async def test_404_is_final_and_not_retried(dedup: Dedup, upstream: Upstream) -> None:
    rid = await dedup.add_get_request("/missing", f"{upstream.url}/missing?status=404")
    result = await dedup.wait_for_result(rid, timeout=5)
    assert (result.success, result.status_code, result.attempts) == (False, 404, 1)
    assert upstream.hits("/missing") == 1
    with pytest.raises(CallFailed) as info:
        raise result.to_error()
    assert info.value.status_code == 404


async def test_retry_after_is_honoured(dedup: Dedup, upstream: Upstream) -> None:
    upstream.script("/limited", [429, 200], retry_after=1)
    start = time.monotonic()
    rid = await dedup.add_get_request("/limited", f"{upstream.url}/limited")
    result = await dedup.wait_for_result(rid, timeout=10)
    assert result.success and result.attempts == 2
    assert time.monotonic() - start >= 0.95


async def test_different_request_same_path_conflicts_unless_join(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1)
    blocker = await hold_slot(dedup)
    rid = await dedup.add_get_request(
        "/api/me", f"{upstream.url}/echo", headers={"Authorization": "Bearer A"}
    )
    with pytest.raises(ConflictError) as info:
        await dedup.add_get_request(
            "/api/me", f"{upstream.url}/echo", headers={"Authorization": "Bearer B"}
        )
    assert info.value.request_id == rid
    with pytest.raises(ConflictError):
        await dedup.add_post_request(
            "/api/me", f"{upstream.url}/echo", {"x": 1}, headers={"Authorization": "Bearer A"}
        )
    # join: another request with the same credentials may join; other credentials never
    joined = await dedup.add_get_request(
        "/api/me",
        f"{upstream.url}/echo?v=2",
        headers={"Authorization": "Bearer A"},
        on_conflict="join",
    )
    assert joined == rid
    with pytest.raises(ConflictError, match="other credentials"):
        await dedup.add_get_request(
            "/api/me",
            f"{upstream.url}/echo",
            headers={"Authorization": "Bearer B"},
            on_conflict="join",
        )
    await blocker.release()
    assert (await dedup.wait_for_result(rid, 5)).success


async def test_priority_order_and_fifo_within_priority(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1)
    blocker = await hold_slot(dedup)
    plan = [(1, "a"), (0, "b"), (2, "c"), (1, "d"), (2, "e"), (0, "f"), (-1, "g")]
    ids = [
        await dedup.add_get_request(f"/p/{name}", f"{upstream.url}/p/{name}", priority=prio)
        for prio, name in plan
    ]
    # a duplicate with a higher priority raises the queued flight's priority
    assert await dedup.add_get_request("/p/f", f"{upstream.url}/p/f", priority=3) == ids[5]
    items = await dedup.get_queue_items()
    queued = [i for i in items if i.state == "queued"]
    assert [i.key for i in queued] == ["/p/f", "/p/c", "/p/e", "/p/a", "/p/d", "/p/b", "/p/g"]
    await blocker.release()
    await asyncio.gather(*[dedup.wait_for_result(rid, 10) for rid in ids])
    assert upstream.order == ["/p/f", "/p/c", "/p/e", "/p/a", "/p/d", "/p/b", "/p/g"]


async def test_queue_items_status_and_clear(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1)
    blocker = await hold_slot(dedup, priority=5)
    ids = [
        await dedup.add_get_request(f"/q/{i}", f"{upstream.url}/q/{i}", priority=i % 2)
        for i in range(5)
    ]
    status = await dedup.get_queue_status()
    assert (status.queue_length, status.running, status.delayed, status.processing) == (
        5,
        1,
        0,
        True,
    )
    assert status.instance_id == dedup.instance_id
    assert [i.id for i in status.instances] == [dedup.instance_id]
    assert status.instances[0].last_seen < 2
    assert status.config["max_concurrent"] == 1
    items = await dedup.get_queue_items()
    assert items[0].key == "/blocker" and items[0].state == "running"
    assert items[0].executor == dedup.instance_id and items[0].priority == 5
    assert {i.request_id for i in items[1:]} == set(ids)
    assert all(i.kind == "request" and i.attempts == 0 and i.age >= 0 for i in items[1:])
    looked_up = await dedup.get_flight(ids[0])
    assert looked_up is not None and looked_up.key == "/q/0" and looked_up.state == "queued"

    waiters = [asyncio.create_task(dedup.wait_for_result(rid, 5)) for rid in ids]
    assert await dedup.clear_queue() == 5
    for result in await asyncio.gather(*waiters):
        assert result.error_type == "QueueCleared"
        assert isinstance(result.to_error(), QueueCleared)
    assert (await dedup.get_queue_status()).queue_length == 0
    assert await dedup.get_flight(ids[0]) is None
    await blocker.release()
    assert upstream.hits() == 0


async def test_wait_for_result_unknown_and_timeout(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(max_concurrent=1)
    with pytest.raises(UnknownRequest):
        await dedup.wait_for_result("no-such-id", timeout=1)
    blocker = await hold_slot(dedup)
    rid = await dedup.add_get_request("/later", f"{upstream.url}/later")
    start = time.monotonic()
    with pytest.raises(WaitTimeout):
        await dedup.wait_for_result(rid, timeout=0.3)
    assert time.monotonic() - start < 2
    await blocker.release()
    assert (await dedup.wait_for_result(rid, timeout=5)).success  # the flight itself went on


async def test_update_config_validates_and_applies(dedup: Dedup) -> None:
    with pytest.raises(ConfigError):
        await dedup.update_config(max_concurrent=0)
    with pytest.raises(ValueError):
        await dedup.update_config(lock_timeout=-1, max_retries=5)
    with pytest.raises(ConfigError):
        await dedup.update_config(namespace="x")
    assert (await dedup.get_queue_status()).config["max_retries"] == 3  # nothing changed
    await dedup.update_config(max_concurrent=2, max_retries=5, retry_delay=3.0, lock_timeout=60.0)
    config = (await dedup.get_queue_status()).config
    assert (
        config["max_concurrent"],
        config["max_retries"],
        config["retry_delay"],
        config["lock_timeout"],
    ) == (2, 5, 3.0, 60.0)


async def test_bad_request_arguments(dedup: Dedup) -> None:
    with pytest.raises(ConfigError):
        await dedup.add_get_request("/x", "ftp://example")
    with pytest.raises(ConfigError):
        await dedup.add_get_request("/x", "http://127.0.0.1:1/", priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await dedup.add_post_request("/x", "http://127.0.0.1:1/", {"bad": object()})
    with pytest.raises(ConfigError):
        await dedup.add_get_request("/x", "http://127.0.0.1:1/", on_conflict="maybe")


async def test_malformed_flight_in_redis_fails_and_worker_keeps_going(
    dedup: Dedup, upstream: Upstream
) -> None:
    k = dedup.keys
    await dedup.store.redis.hset(
        k.flight("planted"),
        mapping={
            "kind": "request",
            "key": "/planted",
            "digest": "0" * 32,
            "prio": 0,
            "seq": 1,
            "att": 0,
            "ttl": -1,
            "cf": 0,
            "fp": "",
            "payload": b"{not json",
            "state": "queued",
            "created": 0,
        },
    )
    await dedup.store.redis.zadd(k.queue, {"planted": -1e9})
    await dedup.store.redis.hset(
        k.flight("planted2"),
        mapping={"kind": "request", "prio": 0, "seq": 2, "payload": '{"method": "GET", "url": 5}'},
    )
    await dedup.store.redis.zadd(k.queue, {"planted2": -1e9 + 1})
    await dedup.store.redis.zadd(k.queue, {"ghost": -1e9 + 2})  # no hash at all
    await dedup.store.redis.set(k.result("garbage"), b"\xff\x00 not a record")

    rid = await dedup.add_get_request("/after", f"{upstream.url}/after")  # triggers grants
    bad = await dedup.wait_for_result("planted", timeout=5)
    assert (bad.success, bad.error_type) == (False, "MalformedFlight")
    bad2 = await dedup.wait_for_result("planted2", timeout=5)
    assert bad2.error_type == "MalformedFlight"
    assert (await dedup.wait_for_result(rid, timeout=5)).success
    garbage = await dedup.wait_for_result("garbage", timeout=1)
    assert (garbage.success, garbage.error_type) == (False, "MalformedResult")
    assert (await dedup.get_queue_status()).queue_length == 0


async def test_cached_answer_is_not_shared_with_a_different_credential(
    dedup: Dedup, upstream: Upstream
) -> None:
    # an answer to a credentialed request is stored only when marked public (RFC 9111)
    url = f"{upstream.url}/value/me?h_cache-control=public"
    alice = await dedup.add_get_request("/api/me", url, headers={"Authorization": "Bearer ALICE"})
    assert (await dedup.wait_for_result(alice, 5)).success
    # the same request again: served from the cache
    assert (
        await dedup.add_get_request("/api/me", url, headers={"Authorization": "Bearer ALICE"})
        == alice
    )
    with pytest.raises(ConflictError) as info:
        await dedup.add_get_request("/api/me", url, headers={"Authorization": "Bearer BOB"})
    assert info.value.request_id == alice
    with pytest.raises(ConflictError):
        await dedup.add_post_request(
            "/api/me", url, {"x": 1}, headers={"Authorization": "Bearer ALICE"}
        )
    with pytest.raises(ConflictError, match="other credentials"):  # not even when asked
        await dedup.add_get_request(
            "/api/me", url, headers={"Authorization": "Bearer BOB"}, on_conflict="join"
        )
    assert upstream.hits("/value/me") == 1
