"""Function flights in one process: once, cached, joined, failures, timeouts, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from dedupcall import CallFailed, ConfigError, Dedup, DedupError, SerializationError, WaitTimeout


async def test_concurrent_callers_share_one_execution(dedup: Dedup) -> None:
    runs = 0

    async def fetch() -> dict[str, int]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return {"n": runs}

    values = await asyncio.gather(*[dedup.call("/users/1", fetch) for _ in range(100)])
    assert runs == 1
    assert values == [{"n": 1}] * 100
    stats = dedup.stats()
    assert (stats["executed"], stats["joined"]) == (1, 99)


async def test_success_is_cached_until_ttl(dedup: Dedup) -> None:
    runs = 0

    async def fetch() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await dedup.call("/k", fetch, ttl=0.3) == 1
    result = await dedup.call_result("/k", fetch)
    assert (result.data, result.cached, result.executed_by) == (1, True, dedup.instance_id)
    await asyncio.sleep(0.4)
    assert await dedup.call("/k", fetch) == 2
    assert dedup.stats()["cached"] == 1


async def test_failure_reaches_caller_with_cause_and_is_not_cached(dedup: Dedup) -> None:
    runs = 0

    async def boom() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("upstream said no")

    with pytest.raises(CallFailed) as info:
        await dedup.call("/fail", boom)
    assert info.value.error_type == "ValueError"
    assert info.value.attempts == 1
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(CallFailed):
        await dedup.call("/fail", boom)
    assert runs == 2  # failures are not served to later callers


async def test_retry_on_retries_with_backoff_then_succeeds(dedup: Dedup) -> None:
    runs = 0

    async def flaky() -> str:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ConnectionError("blip")
        return "ok"

    result = await dedup.call_result("/flaky", flaky, retry_on=ConnectionError)
    assert (result.data, result.attempts) == ("ok", 3)
    assert dedup.stats()["retries"] == 2


async def test_retries_stop_after_max_retries(make_dedup: Callable[..., Dedup]) -> None:
    dedup = make_dedup(max_retries=2)
    runs = 0

    async def always() -> None:
        nonlocal runs
        runs += 1
        raise ConnectionError("down")

    with pytest.raises(CallFailed) as info:
        await dedup.call("/down", always, retry_on=ConnectionError)
    assert runs == 3
    assert info.value.attempts == 3


async def test_a_failure_cached_after_its_last_retry_lives_for_the_flights_ttl(
    make_dedup: Callable[..., Dedup],
) -> None:
    from dedupcall.codec import key_digest

    dedup = make_dedup(max_retries=1, result_ttl=3600.0)
    runs = 0

    async def always() -> None:
        nonlocal runs
        runs += 1
        raise ConnectionError("down")

    options = {"retry_on": ConnectionError, "cache_failures": True, "ttl": 0.5}
    with pytest.raises(CallFailed):
        await dedup.call("/down-ttl", always, **options)
    assert runs == 2
    cache = dedup.keys.cache(key_digest("function", "/down-ttl"))
    assert 0 < await dedup.store.redis.pttl(cache) <= 500  # the flight's ttl, not result_ttl
    with pytest.raises(CallFailed):
        await dedup.call("/down-ttl", always, **options)
    assert runs == 2  # served from the cache meanwhile
    while await dedup.store.redis.exists(cache):
        await asyncio.sleep(0.05)
    with pytest.raises(CallFailed):
        await dedup.call("/down-ttl", always, **options)
    assert runs == 4


async def test_unserializable_result_names_function_and_key(dedup: Dedup) -> None:
    async def weird() -> object:
        return {"when": object()}

    with pytest.raises(CallFailed) as info:
        await dedup.call("/weird", weird)
    assert info.value.error_type == "SerializationError"
    assert "weird" in info.value.message and "/weird" in info.value.message
    assert isinstance(info.value.__cause__, SerializationError)

    # the worker keeps going
    async def fine() -> int:
        return 1

    assert await dedup.call("/after", fine) == 1


async def test_nan_is_rejected_not_stored(dedup: Dedup) -> None:
    async def nan() -> float:
        return float("nan")

    with pytest.raises(CallFailed, match="SerializationError"):
        await dedup.call("/nan", nan)


async def test_wait_timeout_leaves_flight_running_for_others(dedup: Dedup) -> None:
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "done"

    patient = asyncio.create_task(dedup.call("/slow", slow, timeout=5))
    with pytest.raises(WaitTimeout):
        await dedup.call("/slow", slow, timeout=0.1)
    release.set()
    assert await patient == "done"


async def test_cancelled_last_waiter_drops_queued_flight(make_dedup: Callable[..., Dedup]) -> None:
    dedup = make_dedup(max_concurrent=1)
    release = asyncio.Event()

    async def blocker() -> str:
        await release.wait()
        return "b"

    dropped_ran = 0

    async def never() -> str:
        nonlocal dropped_ran
        dropped_ran += 1
        return "must not run"

    running = asyncio.create_task(dedup.call("/blocker", blocker))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(dedup.call("/queued", never))
    for _ in range(100):
        if await dedup.get_flight_by_key("/queued"):
            break
        await asyncio.sleep(0.01)
    item = await dedup.get_flight_by_key("/queued")
    assert item is not None and item.state == "queued"
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(200):
        if await dedup.get_flight_by_key("/queued") is None:
            break
        await asyncio.sleep(0.01)
    assert await dedup.get_flight_by_key("/queued") is None
    release.set()
    assert await running == "b"
    assert (await dedup.get_queue_status()).queue_length == 0
    assert dropped_ran == 0


async def test_bad_arguments_raise_typed_errors(dedup: Dedup) -> None:
    async def f() -> int:
        return 1

    with pytest.raises(ConfigError):
        await dedup.call("/x", f, priority=10**9)
    with pytest.raises(ConfigError):
        await dedup.call("/x", f, ttl=-1)
    with pytest.raises(ValueError):
        await dedup.call("/x", f, timeout=float("nan"))
    with pytest.raises(TypeError):
        await dedup.call(123, f)  # type: ignore[arg-type]
    assert await dedup.call("/x", f) == 1


async def test_hostile_keys_never_share_results(dedup: Dedup) -> None:
    keys: list[str | bytes] = [
        "{a}",
        "a{b}c",
        "}{",
        "*?[]\\",
        "line\r\nbreak",
        "x" * 100_000,
        b"\x00\xff\xfe",
        "\u0430pple",
        "apple",
    ]

    def value_of(key: str | bytes) -> Callable[[], object]:
        async def fetch() -> object:
            return repr(key)[:50]

        return fetch

    values = await asyncio.gather(*[dedup.call(k, value_of(k)) for k in keys])
    assert values == [repr(k)[:50] for k in keys]
    assert dedup.stats()["executed"] == len(keys)


async def test_execution_timeout_fails_the_attempt(make_dedup: Callable[..., Dedup]) -> None:
    dedup = make_dedup(execution_timeout=0.1)

    async def hang() -> None:
        await asyncio.sleep(10)

    with pytest.raises(CallFailed) as info:
        await dedup.call("/hang", hang, timeout=5)
    assert info.value.error_type == "ExecutionTimeout"


async def test_several_dedups_in_one_process_share_by_redis(
    make_dedup: Callable[..., Dedup],
) -> None:
    a, b = make_dedup(), make_dedup()
    runs = 0
    gate = asyncio.Event()

    async def fetch() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 7

    first = asyncio.create_task(a.call("/shared", fetch))
    while runs == 0:
        await asyncio.sleep(0.005)
    second = asyncio.create_task(b.call("/shared", fetch))
    for _ in range(200):
        item = await a.get_flight_by_key("/shared")
        if item and item.waiters == 2:
            break
        await asyncio.sleep(0.01)
    gate.set()
    assert (await first, await second) == (7, 7)
    assert runs == 1
    assert b.stats()["joined"] == 1


async def test_lease_shortened_mid_call_is_renewed_at_the_new_pace(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(lock_timeout=3.0)
    other = make_dedup(lock_timeout=3.0)
    await other.start()
    runs = 0

    async def slow() -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(2.0)
        return "done"

    first = asyncio.create_task(dedup.call("/shrink", slow))
    while runs == 0:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(other.call("/shrink", slow))
    await dedup.update_config(lock_timeout=0.5)  # a config change is not a fault
    assert (await first, await second) == ("done", "done")
    assert runs == 1
    assert dedup.stats()["lease_lost"] == 0


async def test_function_raising_cancelled_error_fails_its_callers(dedup: Dedup) -> None:
    async def cancelled_inside() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner  # raises CancelledError although nobody cancelled the caller

    with pytest.raises(CallFailed) as info:
        await dedup.call("/cancelled-inside", cancelled_inside, timeout=5)
    assert info.value.error_type == "Cancelled"


async def test_bad_retry_on_is_a_config_error(dedup: Dedup) -> None:
    async def f() -> int:
        return 1

    with pytest.raises(ConfigError):
        await dedup.call("/x", f, retry_on="ConnectionError")  # type: ignore[arg-type]
    assert await dedup.call("/x", f, retry_on=[ConnectionError]) == 1  # type: ignore[arg-type]
    assert (await dedup.get_queue_status()).running == 0


async def test_aclose_during_a_running_call_answers_its_caller(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(drain_timeout=0.2)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(60)

    caller = asyncio.create_task(dedup.call("/forever", forever))
    await started.wait()
    await dedup.aclose()
    with pytest.raises(DedupError):
        await asyncio.wait_for(caller, 5)


async def test_first_caller_cancelled_during_start_harms_no_one(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup()

    async def f() -> int:
        return 3

    first = asyncio.create_task(dedup.call("/start", f))
    others = [asyncio.create_task(dedup.call("/start", f)) for _ in range(20)]
    await asyncio.sleep(0)  # the first caller is inside start()
    first.cancel()
    assert await asyncio.gather(*others) == [3] * 20
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_repeated_submit_from_the_executor_gets_its_grant_back(dedup: Dedup) -> None:
    # The lone connection repeats a command whose reply was lost: a submit that was
    # granted must come back granted (same token), or nobody would run the flight.
    from dedupcall import codec

    digest = codec.key_digest("function", "/again")

    async def submit(rid: str) -> list[object]:
        return await dedup.store.submit(
            kind="function",
            key="/again",
            digest=digest,
            rid=rid,
            priority=0,
            ttl_ms=-1,
            cache_failures=False,
            fingerprint="",
            credentials="",
            on_conflict="join",
            payload=b"",
            may_grant=True,
        )

    first = await submit("first-id")
    again = await submit("second-id")
    assert first[0] == again[0] == b"granted"
    assert again[1:3] == [b"first-id", first[2]]  # the same flight, the same lease token
    await dedup.store.redis.delete(dedup.keys.flight("first-id"))  # tidy: nobody runs it


async def test_cancelling_aclose_still_closes_the_instance(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup()
    starting = asyncio.create_task(dedup.start())
    await asyncio.sleep(0)  # the start is under way
    closing = asyncio.create_task(dedup.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.gather(starting, return_exceptions=True)
    await dedup.aclose()  # waits for the shutdown the cancelled call began
    assert not dedup._ready
    other = make_dedup()  # a closed instance is no longer listed as alive
    assert dedup.instance_id not in [i.id for i in (await other.get_queue_status()).instances]


async def test_a_renewal_reply_about_an_adopted_grant_does_not_drop_the_new_lease(
    make_dedup: Callable[..., Dedup],
) -> None:
    from dedupcall.models import Grant

    dedup = make_dedup(lock_timeout=0.6)  # renewed every 0.2 s
    await dedup.start()
    gate, adopted = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "done"

    call = asyncio.create_task(dedup.call("/adopt", held))
    while dedup.worker.executing == 0:
        await asyncio.sleep(0.01)
    lease = next(iter(dedup.worker._leases.values()))
    old = lease.grant
    real_renew = dedup.store.renew

    async def renew_racing_a_regrant(grants: list[Grant]) -> tuple[int, set[str]]:
        if adopted.is_set():
            return await real_renew(grants)
        # Redis gives the flight to us again under a newer token (what the reaper does
        # after a stall) while this renewal, still carrying the old token, is on its way.
        newer = Grant(
            old.request_id,
            f"{old.epoch + 1000}.test.1",
            old.attempts + 1,
            old.lease_ms,
            old.kind,
            old.digest,
        )
        await dedup.store.redis.hset(dedup.keys.flight(old.request_id), "token", newer.token)
        reply = await real_renew(grants)  # reports the old token lost
        dedup.worker.on_grant(newer)  # adopted before the reply is handled
        adopted.set()
        return reply

    dedup.store.renew = renew_racing_a_regrant  # type: ignore[method-assign]
    await adopted.wait()
    await asyncio.sleep(0.5)  # more renewals, now of the newer lease
    gate.set()
    assert await call == "done"
    assert dedup.stats()["lease_lost"] == 0  # completed under the adopted grant
    assert dedup.stats()["executions"] == 1


async def test_a_retry_does_not_wait_for_the_next_heartbeat(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(heartbeat_interval=30.0, retry_delay=0.01)  # no sweep to promote it
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("reset")
        return attempts

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await dedup.call("/retry-soon", flaky, retry_on=ConnectionError) == 2
    assert loop.time() - started < 5.0  # due after ~10 ms; a heartbeat would be 30 s
