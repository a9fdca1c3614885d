"""DedupTransport and AsyncDedupTransport in one process, against the real upstream:
one send per key, rebuilt responses, what passes through, size limits, statuses,
retries, transport errors, per-request options, closing."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dedupcall import (
    AsyncDedupTransport,
    ConfigError,
    Dedup,
    DedupTransport,
    RedisUnavailable,
    ResponseTooLarge,
    TransportCallFailed,
    WaitTimeout,
)
from dedupcall.config import CREDENTIAL_HEADERS
from dedupcall.embedded import free_port
from dedupcall.transport import default_key, request_partition
from upstream import Upstream


def expected_bytes(n: int) -> bytes:
    return random.Random(n).randbytes(n)  # what the upstream's /bytes/<n> sends


async def test_async_identical_requests_share_one_send(dedup: Dedup, upstream: Upstream) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        url = f"{upstream.url}/value/a?delay=0.2"
        responses = await asyncio.gather(*[client.get(url) for _ in range(30)])
        cached = await client.get(url)
    assert upstream.hits("/value/a") == 1
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["exec_id"] for r in [*responses, cached]}) == 1
    outcomes = [r.extensions["dedupcall"]["outcome"] for r in responses]
    assert sorted(set(outcomes)) == ["executed", "joined"] and outcomes.count("executed") == 1
    assert cached.extensions["dedupcall"]["outcome"] == "cached"
    assert (
        cached.extensions["dedupcall"]["request_id"]
        == responses[0].extensions["dedupcall"]["request_id"]
    )
    assert cached.request.url == url and cached.http_version == "HTTP/1.1"
    assert cached.headers["content-type"] == "application/json"
    stats = dedup.stats()
    assert (stats["executed"], stats["joined"], stats["cached"]) == (1, 29, 1)


async def test_sync_client_threads_share_one_send(dedup: Dedup, upstream: Upstream) -> None:
    url = f"{upstream.url}/value/s?delay=0.2"

    def hammer() -> list[httpx.Response]:
        out: list[httpx.Response] = []
        with httpx.Client(transport=DedupTransport(dedup)) as client:
            threads = [
                threading.Thread(target=lambda: out.append(client.get(url))) for _ in range(12)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return out

    responses = await asyncio.to_thread(hammer)
    assert len(responses) == 12 and upstream.hits("/value/s") == 1
    assert len({r.json()["exec_id"] for r in responses}) == 1


def test_sync_transport_without_a_running_loop(
    make_sync_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_sync_dedup()
    with httpx.Client(transport=DedupTransport(dedup)) as client:
        first = client.get(f"{upstream.url}/bytes/70000")
        again = client.get(f"{upstream.url}/bytes/70000")
    assert first.content == again.content == expected_bytes(70000)
    assert [r.extensions["dedupcall"]["outcome"] for r in (first, again)] == ["executed", "cached"]
    assert upstream.hits("/bytes/70000") == 1


async def test_binary_bodies_come_back_byte_identical(dedup: Dedup, upstream: Upstream) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        url = f"{upstream.url}/bytes/300000?delay=0.1"
        responses = await asyncio.gather(*[client.get(url) for _ in range(5)])
        responses.append(await client.get(url))
    assert all(r.content == expected_bytes(300000) for r in responses)
    assert all(r.headers["content-type"] == "application/octet-stream" for r in responses)
    assert upstream.hits("/bytes/300000") == 1


async def test_other_methods_pass_through_unless_listed(dedup: Dedup, upstream: Upstream) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        posts = await asyncio.gather(
            *[client.post(f"{upstream.url}/echo", json={"a": 1}) for _ in range(3)]
        )
    assert upstream.hits("/echo") == 3 and all("dedupcall" not in r.extensions for r in posts)
    assert dedup.stats()["passed_through"] == 3

    transport = AsyncDedupTransport(dedup, methods=["POST"])
    async with httpx.AsyncClient(transport=transport) as client:
        same = await asyncio.gather(
            *[client.post(f"{upstream.url}/echo?delay=0.1", content=b"same") for _ in range(4)]
        )
        other = await client.post(f"{upstream.url}/echo?delay=0.1", content=b"other")
    assert upstream.hits("/echo") == 3 + 2  # one per distinct body
    assert {r.json()["body"] for r in same} == {"same"} and other.json()["body"] == "other"


def test_default_key_is_readable_and_never_holds_a_credential() -> None:
    def key(url: str, **headers: str) -> str:
        return default_key(httpx.Request("GET", url, headers=headers))

    def part(url: str, **headers: str) -> str:
        request = httpx.Request("GET", url, headers=headers)
        return request_partition(request, CREDENTIAL_HEADERS, None)

    assert key("https://api.example.com/users/1?b=2&a=1") == key(
        "https://api.example.com/users/1?a=1&b=2"
    )
    assert key("https://api.example.com/u?a=2&a=1") != key("https://api.example.com/u?a=1&a=2")
    assert key("https://api.example.com/users/1") == "GET https://api.example.com/users/1"
    # credentials separate flights through a digest kept out of the readable key
    me = "https://api.example.com/me"
    alice, bob = key(me, Authorization="Bearer alice-secret"), key(me, Authorization="b")
    assert alice == bob == "GET https://api.example.com/me"
    assert part(me, Authorization="Bearer alice") != part(me, Authorization="Bearer bob")
    assert "alice" not in part(me, Authorization="Bearer alice")
    for header in ("Cookie", "X-Api-Key", "X-Auth-Token", "X-Amz-Security-Token", "Accept"):
        assert part(me, **{header: "1"}) != part(me, **{header: "2"}) != part(me)
    assert part(me) == ""
    assert key("http://api.example.com/x") != key("https://api.example.com/x")


async def test_credentials_split_flights(dedup: Dedup, upstream: Upstream) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        url = f"{upstream.url}/value/me?delay=0.1"
        tokens = ["alice", "bob", "alice", "bob"]
        await asyncio.gather(
            *[client.get(url, headers={"Authorization": f"Bearer {t}"}) for t in tokens]
        )
    assert upstream.hits("/value/me") == 2


async def test_key_callable_and_per_request_options(dedup: Dedup, upstream: Upstream) -> None:
    def by_path(request: httpx.Request) -> str | None:
        return None if request.url.path.startswith("/value/private") else request.url.path

    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup, key=by_path)) as client:
        await asyncio.gather(
            *[client.get(f"{upstream.url}/value/k?n={i}&delay=0.1") for i in range(3)]
        )
        await client.get(f"{upstream.url}/value/private")
        await client.get(f"{upstream.url}/value/private")
        off = await client.get(
            f"{upstream.url}/value/k", extensions={"dedupcall": {"enabled": False}}
        )
        ttl = await client.get(
            f"{upstream.url}/value/t", extensions={"dedupcall": {"ttl": 0.1, "key": "/t"}}
        )
        await asyncio.sleep(0.2)
        again = await client.get(f"{upstream.url}/value/t", extensions={"dedupcall": {"key": "/t"}})
        with pytest.raises(ConfigError, match="extensions"):
            await client.get(f"{upstream.url}/value/k", extensions={"dedupcall": {"tll": 1}})
        with pytest.raises(ConfigError, match="priority"):
            await client.get(
                f"{upstream.url}/value/k", extensions={"dedupcall": {"priority": "high"}}
            )
    assert upstream.hits("/value/k") == 2  # the three queries share "/value/k"; off is direct
    assert upstream.hits("/value/private") == 2
    assert "dedupcall" not in off.extensions
    assert upstream.hits("/value/t") == 2  # the short ttl expired
    assert ttl.json()["exec_id"] != again.json()["exec_id"]


async def test_response_over_max_body_bytes_goes_only_to_its_sender(
    dedup: Dedup, upstream: Upstream
) -> None:
    for query in ("delay=0.2", "delay=0.2&chunked=1"):  # announced, and found while reading
        upstream.reset()
        transport = AsyncDedupTransport(dedup, max_body_bytes=10_000)
        async with httpx.AsyncClient(transport=transport) as client:
            url = f"{upstream.url}/bytes/50000?{query}"
            outcomes = await asyncio.gather(
                *[client.get(url) for _ in range(4)], return_exceptions=True
            )
        sent = [o for o in outcomes if isinstance(o, httpx.Response)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(sent) == 1, outcomes
        assert sent[0].content == expected_bytes(50000)  # whole, never truncated
        assert sent[0].extensions["dedupcall"]["outcome"] == "executed"
        assert len(refused) == 3
        for exc in refused:
            assert isinstance(exc, ResponseTooLarge) and isinstance(exc, httpx.TransportError)
            assert "retry without dedup" in str(exc) and exc.request.url == url
        assert upstream.hits("/bytes/50000") == 1


def test_sync_response_over_max_body_bytes(
    make_sync_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_sync_dedup()
    with httpx.Client(transport=DedupTransport(dedup, max_body_bytes=10_000)) as client:
        response = client.get(f"{upstream.url}/bytes/40000?chunked=1")
        assert response.content == expected_bytes(40000)
        small = client.get(f"{upstream.url}/bytes/9000?chunked=1")
        assert small.content == expected_bytes(9000)


async def test_only_2xx_is_cached_unless_told(dedup: Dedup, upstream: Upstream) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        first = await client.get(f"{upstream.url}/value/missing?status=404")
        second = await client.get(f"{upstream.url}/value/missing?status=404")
    assert (first.status_code, second.status_code) == (404, 404)
    assert upstream.hits("/value/missing") == 2
    transport = AsyncDedupTransport(dedup, cache_statuses={200, 404})
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(f"{upstream.url}/value/gone?status=404")
        cached = await client.get(f"{upstream.url}/value/gone?status=404")
    assert cached.status_code == 404 and cached.extensions["dedupcall"]["outcome"] == "cached"
    assert upstream.hits("/value/gone") == 1


async def test_5xx_retried_then_last_status_kept(dedup: Dedup, upstream: Upstream) -> None:
    upstream.script("/value/flaky", [503, 503, 200])
    upstream.script("/value/down", [503])
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        ok = await asyncio.gather(*[client.get(f"{upstream.url}/value/flaky") for _ in range(3)])
        down = await asyncio.gather(*[client.get(f"{upstream.url}/value/down") for _ in range(3)])
    assert [r.status_code for r in ok] == [200] * 3 and upstream.hits("/value/flaky") == 3
    assert [r.status_code for r in down] == [503] * 3
    assert upstream.hits("/value/down") == 1 + dedup.config.max_retries


async def test_transport_errors_become_transport_call_failed(
    make_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_dedup(max_retries=1)
    url = f"http://127.0.0.1:{free_port()}/nothing"
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        outcomes = await asyncio.gather(
            *[client.get(url) for _ in range(3)], return_exceptions=True
        )
    for exc in outcomes:
        assert isinstance(exc, TransportCallFailed) and isinstance(exc, httpx.TransportError)
        assert exc.error_type == "ConnectError" and exc.attempts == 2
        assert exc.request.url == url
    causes = [exc.__cause__ for exc in outcomes if isinstance(exc, BaseException)]
    # Every caller in the process that sent it shares the original exception.
    assert all(isinstance(c, httpx.ConnectError) for c in causes)


async def test_wait_timeout(dedup: Dedup, upstream: Upstream) -> None:
    transport = AsyncDedupTransport(dedup, timeout=0.1)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(WaitTimeout):
            await client.get(f"{upstream.url}/value/slow?delay=0.5")


class CountingTransport(httpx.AsyncHTTPTransport):
    closed = 0

    async def aclose(self) -> None:
        type(self).closed += 1
        await super().aclose()


class CountingSyncTransport(httpx.HTTPTransport):
    closed = 0

    def close(self) -> None:
        type(self).closed += 1
        super().close()


async def test_closing_closes_the_inner_transport(dedup: Dedup) -> None:
    async with AsyncDedupTransport(dedup, CountingTransport()):
        pass
    await AsyncDedupTransport(dedup, CountingTransport()).aclose()
    assert CountingTransport.closed == 2
    with DedupTransport(dedup, CountingSyncTransport()):
        pass
    DedupTransport(dedup, CountingSyncTransport()).close()
    assert CountingSyncTransport.closed == 2


async def test_redis_down_raises_or_bypasses(upstream: Upstream) -> None:
    down = Dedup(f"redis://127.0.0.1:{free_port()}/0", namespace="down", socket_timeout=0.5)
    url = f"{upstream.url}/value/direct"
    async with httpx.AsyncClient(transport=AsyncDedupTransport(down)) as client:
        with pytest.raises(RedisUnavailable):
            await client.get(url)
    transport = AsyncDedupTransport(down, on_redis_error="bypass")
    async with httpx.AsyncClient(transport=transport) as client:
        responses = [await client.get(url) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    assert upstream.hits("/value/direct") == 3 and down.stats()["bypassed"] == 3
    await down.aclose()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"methods": "GET"}, "methods"),
        ({"key": "GET /x"}, "key="),
        ({"cache_statuses": ["200"]}, "cache_statuses"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"on_redis_error": "maybe"}, "on_redis_error"),
        ({"ttl": 0}, "result_ttl"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], match: str) -> None:
    for twin in (DedupTransport, AsyncDedupTransport):
        with pytest.raises(ConfigError, match=match):
            twin(None, **options)


async def test_a_cancelled_request_leaves_the_others_their_response(
    dedup: Dedup, upstream: Upstream
) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        url = f"{upstream.url}/value/c?delay=0.3"
        first = asyncio.create_task(client.get(url))
        while upstream.hits("/value/c") == 0:
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(client.get(url)) for _ in range(3)]
        await asyncio.sleep(0.05)
        first.cancel()
        rest[0].cancel()
        responses = await asyncio.gather(*rest[1:])
    assert [r.status_code for r in responses] == [200, 200]
    assert upstream.hits("/value/c") == 1


async def test_range_and_conditional_requests_pass_through(
    dedup: Dedup, upstream: Upstream
) -> None:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup)) as client:
        url = f"{upstream.url}/value/r"
        full = await client.get(url)
        ranged = await client.get(url, headers={"Range": "bytes=0-3"})
        revalidated = await client.get(url, headers={"If-None-Match": '"v1"'})
        again = await client.get(url)
    assert "dedupcall" not in ranged.extensions and "dedupcall" not in revalidated.extensions
    assert again.extensions["dedupcall"]["outcome"] == "cached"
    assert again.json()["exec_id"] == full.json()["exec_id"]
    assert upstream.hits("/value/r") == 3
    assert 206 not in AsyncDedupTransport(dedup)._options.cache_statuses


def test_sync_transport_retry_never_overlaps_a_slow_send(
    make_sync_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_sync_dedup(execution_timeout=0.2, retry_delay=0.01, max_retries=1)
    with (
        httpx.Client(transport=DedupTransport(dedup)) as client,
        pytest.raises(TransportCallFailed, match="ExecutionTimeout"),
    ):
        client.get(f"{upstream.url}/value/slow?delay=0.5")
    assert upstream.hits("/value/slow") == 2  # the first attempt, then its retry
    assert upstream.peak("/value/slow") == 1  # never both at once


async def test_non_idempotent_methods_are_not_resent_blindly(
    dedup: Dedup, upstream: Upstream
) -> None:
    upstream.script("/value/order", [503, 200])
    transport = AsyncDedupTransport(dedup, methods=["POST"])
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(f"{upstream.url}/value/order", json={"n": 1})
    assert response.status_code == 503  # a POST may have been processed: not retried
    assert upstream.hits("/value/order") == 1


def test_pass_through_needs_no_dedup(upstream: Upstream) -> None:
    from dedupcall.entry import current_default, reset_default

    reset_default()
    with httpx.Client(transport=DedupTransport()) as client:
        assert client.post(f"{upstream.url}/echo", content=b"x").status_code == 200
    assert current_default() is None  # none was built from the environment to count it
