"""Shared config has one set of bounds, obeyed by Python's checks and by what the scripts
read from Redis: what status reports is what is enforced, and no value breaks the flow."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from dedupcall import ConfigError, Dedup, Observer
from dedupcall.keys import KeySpace
from runs import run_python


async def peak_of(dedup: Dedup, keys: list[str]) -> int:
    running = peak = 0

    async def work() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return 1

    await asyncio.gather(*[dedup.call(key, work, timeout=10) for key in keys])
    return peak


@pytest.mark.parametrize("stored", ["-1", "2.5", "abc", "1e3", "0x10", "", "9" * 20, " 3"])
async def test_a_malformed_limit_in_redis_is_restored_never_enforced(
    stored: str, make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup(max_concurrent=1)
    await dedup.start()
    raw = aioredis.Redis.from_url(redis_url)
    await raw.hset(KeySpace(namespace).config, "max_concurrent", stored)
    assert await peak_of(dedup, [f"/bad/{i}" for i in range(4)]) == 1
    assert (await dedup.get_queue_status()).config["max_concurrent"] == 1
    assert await raw.hget(KeySpace(namespace).config, "max_concurrent") == b"1"
    await raw.aclose()


async def test_status_reports_what_the_scripts_enforce(
    make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup(max_concurrent=2)
    await dedup.start()
    raw = aioredis.Redis.from_url(redis_url)
    await raw.hset(KeySpace(namespace).config, "max_concurrent", "-1")
    # status itself restores the value before reporting it
    assert (await dedup.get_queue_status()).config["max_concurrent"] == 2
    assert await raw.hget(KeySpace(namespace).config, "max_concurrent") == b"2"
    await raw.aclose()


@pytest.mark.parametrize(
    "values",
    [
        {"result_ttl": 1e15},
        {"retention": 1e12},
        {"lock_timeout": 1e11},
        {"retry_delay": 1e9},
        {"max_concurrent": 10**9},
        {"max_retries": 10**6},
    ],
)
async def test_absurd_values_are_refused_by_every_writer(
    values: dict[str, float], make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup()
    with pytest.raises(ConfigError):
        await dedup.update_config(**values)
    with pytest.raises(ConfigError):
        make_dedup(**values)
    async with Observer(redis_url, namespace) as observer:
        with pytest.raises(ConfigError):
            await observer.update_config(**values)
    ((name, value),) = values.items()
    out = run_python(
        "-m", "dedupcall", "config", "set", f"{name}={value}", "--url", redis_url, "-n", namespace
    )
    assert out.returncode == 2 and name in out.stderr, out.stderr


async def test_an_absurd_value_put_in_redis_by_hand_never_breaks_completions(
    make_dedup: Callable[..., Dedup], redis_url: str, namespace: str
) -> None:
    dedup = make_dedup(result_ttl=60.0)
    await dedup.start()
    raw = aioredis.Redis.from_url(redis_url)
    await raw.hset(KeySpace(namespace).config, "result_ttl", "1000000000000000")
    runs = 0

    async def once() -> str:
        nonlocal runs
        runs += 1
        return "v"

    assert await dedup.call("/absurd", once) == "v"
    assert await dedup.call("/absurd", once) == "v"  # completed and cached, not run again
    assert runs == 1
    assert await raw.hget(KeySpace(namespace).config, "result_ttl") == b"60"
    await raw.aclose()


async def test_a_malformed_grant_message_is_ignored(
    make_dedup: Callable[..., Dedup], caplog: pytest.LogCaptureFixture
) -> None:
    dedup = make_dedup()
    await dedup.start()
    channel = dedup.keys.instance_channel(dedup.instance_id)
    for message in ["g id 1.x.1 1 1e+14 function d", "g id t x 1000 function d", "junk", "g"]:
        await dedup.store.redis.publish(channel, message)

    async def one() -> int:
        return 1

    with caplog.at_level(logging.WARNING, logger="dedupcall"):
        assert await dedup.call("/after-junk", one) == 1
        for _ in range(100):
            if caplog.text.count("malformed grant") >= 4:
                break
            await asyncio.sleep(0.01)
    assert caplog.text.count("malformed grant") == 4
    assert dedup.stats()["reconnects"] == 0  # the subscriber never dropped
