"""Attacks on the deadline of queued requests (README: "A queued request waits for a
worker until a deadline ...; only past that deadline, unclaimed, does it fail with
NoExecutor"). A request that was claimed once and only waits out its retry's
Retry-After must not be failed as ``NoExecutor``."""

from __future__ import annotations

from collections.abc import Callable

from dedupcall import Dedup
from upstream import Upstream


async def test_a_claimed_request_waiting_out_retry_after_is_retried_not_failed_as_unclaimed(
    make_dedup: Callable[..., Dedup], upstream: Upstream
) -> None:
    dedup = make_dedup(retention=1.0)  # a live worker all along
    await dedup.start()
    upstream.script("/flaky", [503, 200], retry_after=[2, None])
    rid = await dedup.add_get_request("/flaky", f"{upstream.url}/flaky")
    result = await dedup.wait_for_result(rid, timeout=10)
    assert (result.success, result.error_type) == (True, None), result.error
    assert upstream.hits("/flaky") == 2
