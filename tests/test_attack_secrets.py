"""Attacks: secrets in URLs that the redaction misses. Credentials in a URL's userinfo
come as a token for a user name (``https://TOKEN@github.com``), a key with an empty
password (``https://sk_live_...:@api.stripe.com``, as curl -u key: sends it) or a password
with an ``@`` in it (httpx accepts it); and a sync caller's timeout message."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import pytest

from dedupcall import Dedup, WaitTimeout, queued_api
from upstream import Upstream

SECRET = "SECRET-4711"


@pytest.mark.parametrize("userinfo", [f"ghp_{SECRET}", f"sk_live_{SECRET}:", f"user:p@ss-{SECRET}"])
async def test_credentials_in_a_url_userinfo_never_show(
    userinfo: str,
    make_dedup: Callable[..., Dedup],
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dedup = make_dedup()
    url = upstream.url.replace("://", f"://{userinfo}@") + "/private?status=404&delay=0.3"
    with caplog.at_level(logging.DEBUG, logger="dedupcall"):
        rid = await dedup.add_get_request(url, url)  # the URL as its own api_path
        for _ in range(100):  # while it runs (the upstream takes 0.3 s)
            if items := await dedup.get_queue_items():
                break
            await asyncio.sleep(0.01)
        result = await dedup.wait_for_result(rid, timeout=5)
    assert result.status_code == 404  # it was sent, with its credentials
    stored = await dedup.store.redis.get(dedup.keys.result(rid))
    shown = {
        "items": " ".join(item.key for item in items),
        "stored record": stored.decode(),
        "error": f"{result.error} {result.api_path}",
        "logs": caplog.text,
    }
    assert {where: SECRET in text for where, text in shown.items()} == dict.fromkeys(shown, False)


def test_a_sync_callers_timeout_never_shows_a_secret_of_its_key(
    make_sync_dedup: Callable[..., Dedup],
) -> None:
    dedup = make_sync_dedup()
    running = threading.Event()

    @queued_api(path="/search?q={q}&api_key={key}", dedup=dedup, timeout=0.2)
    def search(q: str, key: str) -> str:
        running.set()
        time.sleep(0.6)
        return q

    runner = threading.Thread(target=search, args=("x", SECRET))
    runner.start()
    running.wait(10)
    with pytest.raises(WaitTimeout) as raised:  # a second caller joins, then gives up
        search("x", SECRET)
    runner.join(10)
    assert "api_key=***" in str(raised.value) and SECRET not in str(raised.value)
