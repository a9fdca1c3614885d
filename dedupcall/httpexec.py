"""Sends one queued HTTP request with httpx and classifies the response for the worker."""

from __future__ import annotations

import base64
import email.utils
import time
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpOutcome:
    """What one attempt produced: a final success or failure, or a retryable failure."""

    ok: bool
    retryable: bool
    status_code: int | None
    data: Any
    error_type: str | None = None
    message: str | None = None
    retry_after_ms: int = 0
    headers: tuple[tuple[str, str], ...] = ()  # the response's


def retry_after_ms(value: str | None) -> int:
    """``Retry-After`` as milliseconds: delta-seconds or an HTTP date; 0 when absent or bad."""
    if not value:
        return 0
    value = value.strip()
    if value.isdigit():
        return min(int(value), 3600) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0
    return int(max(0.0, min(when - time.time(), 3600.0)) * 1000)


def response_data(response: httpx.Response) -> Any:
    """The parsed JSON body, else the text body (as the original system returned it)."""
    try:
        return response.json()
    except ValueError:
        return response.text


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any] | None,
    timeout: float,
    label: str,
) -> HttpOutcome:
    """Send once; 5xx/429/transport errors are retryable, other 4xx final failures.
    ``label`` names the request in messages (the URL with its secrets redacted)."""
    kwargs: dict[str, Any] = {"headers": headers, "timeout": timeout}
    if body is not None:
        if "json" in body:
            kwargs["json"] = body["json"]
        else:
            kwargs["content"] = base64.b64decode(body["content"])
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        return HttpOutcome(False, True, None, None, "Timeout", f"{type(exc).__name__}: {exc}")
    except httpx.TransportError as exc:
        return HttpOutcome(
            False, True, None, None, "TransportError", f"{type(exc).__name__}: {exc}"
        )
    status = response.status_code
    data = response_data(response)
    answer_headers = tuple(response.headers.multi_items())
    if status < 400:
        return HttpOutcome(True, False, status, data, headers=answer_headers)
    message = f"HTTP {status} from {method} {label}"
    if status in RETRY_STATUSES:
        wait = retry_after_ms(response.headers.get("retry-after"))
        return HttpOutcome(
            False, True, status, data, "HTTPStatusError", message, wait, headers=answer_headers
        )
    return HttpOutcome(
        False, False, status, data, "HTTPStatusError", message, headers=answer_headers
    )
