"""Who may receive whose answer. dedupcall is a shared cache (RFC 9111): private,
no-store and cookie-setting answers, and answers to credentialed requests, never reach
another user or a later caller; Vary is honoured; stored answers live no longer than
their stated freshness; credentials in any header keep tenants apart; secrets never show."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from dedupcall import AsyncDedupTransport, ConflictError, Dedup, queued_api
from dedupcall.codec import key_digest
from procs import Spawner
from upstream import Upstream


def target(upstream: Upstream, path: str, delay: float = 0.0, **headers: str) -> str:
    """A URL whose response carries ``headers`` (``cache_control="private"``)."""
    query = {f"h_{name.replace('_', '-')}": value for name, value in headers.items()}
    if delay:
        query["delay"] = str(delay)
    return f"{upstream.url}{path}?{urlencode(query)}" if query else f"{upstream.url}{path}"


async def fetch(dedup: Dedup, url: str, headers: dict[str, str], **options: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=AsyncDedupTransport(dedup, **options)) as client:
        return await client.get(url, headers=headers)


def exec_id(response: httpx.Response) -> str:
    return str(response.json()["exec_id"])


ANON: dict[str, str] = {}
ALICE = {"Authorization": "Bearer alice"}
BOB = {"Authorization": "Bearer bob"}

# (response headers, A's request headers, B's request headers,
#  B shares A's answer while in flight, B gets it from the store later)
MATRIX = [
    ({"cache_control": "private, no-store", "set_cookie": "sid=session-1"}, ANON, ANON, 0, 0),
    ({"cache_control": "private, no-store", "set_cookie": "sid=session-1"}, ALICE, ALICE, 1, 0),
    ({"cache_control": "private, no-store", "set_cookie": "sid=session-1"}, ALICE, BOB, 0, 0),
    ({"cache_control": "no-store"}, ALICE, ALICE, 1, 0),  # e.g. an OAuth token answer
    ({"cache_control": "private"}, ANON, ANON, 0, 0),
    ({"set_cookie": "sid=1"}, ANON, ANON, 0, 0),
    ({}, ALICE, ALICE, 1, 0),  # credentialed, not marked public: never stored
    ({"cache_control": "public, max-age=60"}, ALICE, ALICE, 1, 1),
    ({"cache_control": "s-maxage=60"}, ALICE, ALICE, 1, 1),
    ({}, {"X-Api-Key": "a"}, {"X-Api-Key": "b"}, 0, 0),
    ({"cache_control": "public"}, {"X-Auth-Token": "a"}, {"X-Auth-Token": "b"}, 0, 0),
    ({"cache_control": "public"}, {"Cookie": "s=a"}, {"Cookie": "s=b"}, 0, 0),
    ({}, {"X-Amz-Security-Token": "a"}, {"X-Amz-Security-Token": "b"}, 0, 0),
    ({"vary": "X-Tenant"}, {"X-Tenant": "1"}, {"X-Tenant": "2"}, 0, 0),
    ({"vary": "X-Tenant"}, {"X-Tenant": "1"}, {"X-Tenant": "1"}, 1, 1),
    ({"vary": "*"}, ANON, ANON, 0, 0),
    ({"cache_control": "max-age=0"}, ANON, ANON, 1, 0),
    ({"cache_control": "no-cache"}, ANON, ANON, 1, 0),
    ({}, ANON, ANON, 1, 1),
]


@pytest.mark.parametrize(("answer", "a", "b", "joined", "stored"), MATRIX)
async def test_transport_sharing_matrix(
    answer: dict[str, str],
    a: dict[str, str],
    b: dict[str, str],
    joined: int,
    stored: int,
    make_dedup: Callable[..., Dedup],
    upstream: Upstream,
) -> None:
    first, second = make_dedup(), make_dedup()  # two instances
    # in flight: both ask at once, the upstream takes 0.15 s
    url = target(upstream, "/m/inflight", 0.15, **answer)
    one, two = await asyncio.gather(fetch(first, url, a), fetch(second, url, b))
    assert (exec_id(one) == exec_id(two)) == bool(joined), (answer, a, b)
    # later: A's answer is complete; B asks after it
    url = target(upstream, "/m/later", **answer)
    one = await fetch(first, url, a)
    two = await fetch(second, url, b)
    assert (exec_id(one) == exec_id(two)) == bool(stored), (answer, a, b)


async def test_a_private_answer_with_a_cookie_reaches_no_other_user_across_processes(
    spawn: Spawner,
    redis_url: str,
    namespace: str,
    upstream: Upstream,
    make_dedup: Callable[..., Dedup],
) -> None:
    url = target(upstream, "/session", cache_control="private, no-store", set_cookie="sid=A")
    path = url.removeprefix(upstream.url)
    spec = {
        "url": redis_url,
        "namespace": namespace,
        "upstream": upstream.url,
        "mode": "transport",
        "flavour": "async",
        "paths": [path],
        "callers": 1,
        "start_at": time.time(),
    }
    alice = spawn("entry_caller.py", json.dumps(spec)).json(timeout=30)
    bob = await fetch(make_dedup(), url, ANON)
    assert upstream.hits("/session") == 2
    assert bob.extensions.get("dedupcall", {}).get("outcome") != "cached"
    assert hashlib.sha256(bob.content).hexdigest() != alice["responses"][path][0]["sha256"]


async def test_stored_answers_live_no_longer_than_their_stated_freshness(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup()
    url = target(upstream, "/fresh", cache_control="s-maxage=1, max-age=60")
    first = await fetch(dedup, url, ANON, ttl=60)
    assert exec_id(await fetch(dedup, url, ANON, ttl=60)) == exec_id(first)
    await asyncio.sleep(1.1)  # s-maxage, which a shared cache obeys, has passed
    assert exec_id(await fetch(dedup, url, ANON, ttl=60)) != exec_id(first)


async def test_set_cookie_answers_are_shared_only_when_allowed(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup()
    url = target(upstream, "/cookie", set_cookie="theme=dark")
    first = await fetch(dedup, url, ANON, share_set_cookie=True)
    second = await fetch(dedup, url, ANON, share_set_cookie=True)
    assert exec_id(first) == exec_id(second)
    assert second.extensions["dedupcall"]["outcome"] == "cached"


async def test_repeated_query_names_keep_their_order(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup()
    one = await fetch(dedup, f"{upstream.url}/order?a=2&a=1&b=0", ANON)
    two = await fetch(dedup, f"{upstream.url}/order?b=0&a=1&a=2", ANON)
    three = await fetch(dedup, f"{upstream.url}/order?b=0&a=2&a=1", ANON)
    assert exec_id(one) != exec_id(two) and exec_id(one) == exec_id(three)


@pytest.mark.parametrize("header", ["X-Api-Key", "Cookie", "X-Auth-Token", "Proxy-Authorization"])
async def test_queued_requests_never_share_across_credentials(
    header: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup()
    for stored in (False, True):  # an answer to a credentialed request, marked public or not
        url = target(upstream, "/q/me", 0.2, **({"cache_control": "public"} if stored else {}))
        alice = await dedup.add_get_request(f"/me/{stored}", url, headers={header: "alice"})
        for join in ("raise", "join"):  # in flight: never joined across credentials
            with pytest.raises(ConflictError, match="other credentials"):
                await dedup.add_get_request(
                    f"/me/{stored}", url, headers={header: "bob"}, on_conflict=join
                )
        first = await dedup.wait_for_result(alice, timeout=5)
        if stored:  # stored for alice's credentials only
            with pytest.raises(ConflictError, match="other credentials"):
                await dedup.add_get_request(f"/me/{stored}", url, headers={header: "bob"})
        else:  # not stored: bob's request is a flight of its own, with its own answer
            bob = await dedup.add_get_request(f"/me/{stored}", url, headers={header: "bob"})
            second = await dedup.wait_for_result(bob, timeout=5)
            assert bob != alice and second.data["exec_id"] != first.data["exec_id"]
    assert upstream.hits("/q/me") == 3


@pytest.mark.parametrize(
    "answer", [{"cache_control": "no-store"}, {"cache_control": "private"}, {"set_cookie": "s=1"}]
)
async def test_queued_requests_never_store_what_a_shared_cache_must_not(
    answer: dict[str, str], make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup()
    url = target(upstream, "/q/private", **answer)
    first = await dedup.add_get_request("/q/private", url, headers=ALICE)
    assert (await dedup.wait_for_result(first, timeout=5)).success
    second = await dedup.add_get_request("/q/private", url, headers=ALICE)
    assert second != first and (await dedup.wait_for_result(second, timeout=5)).success
    assert upstream.hits("/q/private") == 2


async def test_queued_requests_honour_vary_and_freshness(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup()
    url = target(upstream, "/q/vary", vary="X-Tenant", cache_control="s-maxage=30")
    first = await dedup.add_get_request("/q/vary", url, headers={"X-Tenant": "1"})
    assert (await dedup.wait_for_result(first, timeout=5)).success
    cache = dedup.keys.cache(key_digest("request", "/q/vary"))
    assert 0 < await dedup.store.redis.pttl(cache) <= 30_000  # s-maxage caps result_ttl
    assert await dedup.add_get_request("/q/vary", url, headers={"X-Tenant": "1"}) == first
    with pytest.raises(ConflictError, match="varies"):
        await dedup.add_get_request("/q/vary", url, headers={"X-Tenant": "2"})


async def test_secrets_never_show_in_keys_logs_records_or_views(
    make_dedup: Callable[..., Dedup], upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    secret, api_key = "SECRET-123", "ak-77"
    dedup = make_dedup(key_secret="k" * 32)
    gate = asyncio.Event()

    @queued_api(path="/search?q={q}&api_key={key}", dedup=dedup)
    async def search(q: str, key: str) -> str:
        await gate.wait()
        return q

    with caplog.at_level(logging.DEBUG, logger="dedupcall"):
        calls = [asyncio.create_task(search("x", k)) for k in (secret, "OTHER-456")]
        url = f"{upstream.url}/s?api_key={secret}&delay=0.3"
        rid = await dedup.add_get_request("/s?token=" + secret, url, headers={"X-Api-Key": api_key})
        fetched = asyncio.create_task(fetch(dedup, url, {"X-Api-Key": api_key}))
        for _ in range(100):
            items = await dedup.get_queue_items()
            if len(items) == 4:
                break
            await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.gather(*calls) == ["x", "x"]  # two flights: distinct secrets
        await fetched
        await dedup.wait_for_result(rid, timeout=5)
    stored = await dedup.store.redis.get(dedup.keys.result(rid))
    shown = " ".join(i.key for i in items) + caplog.text + stored.decode()
    assert "api_key=***" in shown and "token=***" in shown
    for leaked in (secret, api_key, hashlib.sha256(api_key.encode()).hexdigest()[:16]):
        assert leaked not in shown
    assert len(items) == 4
