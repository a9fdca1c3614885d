"""Attacks on who receives whose answer: a queued request that refuses a stored answer
(its own Cache-Control) is not given one."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlencode

import pytest

from dedupcall import Dedup
from upstream import Upstream


def target(upstream: Upstream, path: str, delay: float = 0.0, **headers: str) -> str:
    query = {f"h_{name.replace('_', '-')}": value for name, value in headers.items()}
    if delay:
        query["delay"] = str(delay)
    return f"{upstream.url}{path}?{urlencode(query)}"


@pytest.mark.parametrize("directive", ["no-cache", "max-age=0"])
async def test_a_queued_request_refusing_a_stored_answer_is_not_given_one(
    directive: str, make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    # RFC 9111 §5.2.1: a request's no-cache / max-age=0 refuses a stored answer; the
    # transports pass such requests through (CONDITIONAL / REFUSES_STORED), queued
    # requests must not answer them from the store either.
    dedup = make_dedup()
    url = f"{upstream.url}/q/fresh"
    first = await dedup.add_get_request("/q/fresh", url)
    assert (await dedup.wait_for_result(first, timeout=5)).success
    again = await dedup.add_get_request("/q/fresh", url, headers={"Cache-Control": directive})
    assert again != first
    assert (await dedup.wait_for_result(again, timeout=5)).success
    assert upstream.hits("/q/fresh") == 2
