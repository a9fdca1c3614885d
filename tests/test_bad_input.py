"""Bad input is the caller's typed error, raised before anything is batched: it never
fails the callers whose commands would have shared a pipeline with it."""

from __future__ import annotations

import asyncio

import pytest

from dedupcall import Dedup, SerializationError, queued_api


async def test_a_key_that_cannot_be_encoded_fails_alone(dedup: Dedup) -> None:
    async def value() -> str:
        await asyncio.sleep(0.01)
        return "ok"

    bad = "/lone-\ud800-surrogate"
    calls = [dedup.call(f"/neighbour/{i}", value) for i in range(30)]
    calls.insert(15, dedup.call(bad, value))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes.pop(15), SerializationError)
    assert outcomes == ["ok"] * 30
    assert dedup.stats()["bypassed"] == 0


async def test_bad_text_in_a_queued_request_is_a_typed_error(dedup: Dedup) -> None:
    with pytest.raises(SerializationError):
        await dedup.add_get_request("/q-\udcff", "http://127.0.0.1:1/x")
    with pytest.raises(SerializationError):
        await dedup.add_get_request("/q", "http://127.0.0.1:1/x", headers={"X-Bad": "\ud800"})


async def test_a_decorated_function_with_a_bad_key_fails_typed_even_in_bypass_mode(
    dedup: Dedup,
) -> None:
    runs = 0

    @queued_api(path="/users/{name}", dedup=dedup, on_redis_error="bypass")
    async def user(name: str) -> str:
        nonlocal runs
        runs += 1
        return name

    with pytest.raises(SerializationError):
        await user("\ud800")
    assert runs == 0 and dedup.stats()["bypassed"] == 0
    assert await user("ann") == "ann"
