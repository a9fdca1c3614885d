"""Reading an httpx response body in full, up to a size limit, sync and async. Past the
limit the response stays live (what was read, then the rest of its stream) for the caller
that sent the request: a body is shared whole or not at all, never truncated."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Captured:
    """A response read in full by the process that sent the request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes
    reason: bytes


class TooLarge(Exception):
    """The body passed ``max_body_bytes``: ``response`` is still live (what was read
    first, then the rest of the stream) for the caller that sent it."""

    def __init__(self, response: httpx.Response, limit: int) -> None:
        super().__init__(f"the response body exceeds max_body_bytes={limit}")
        self.response = response


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _captured(response: httpx.Response, body: bytes) -> Captured:
    return Captured(
        response.status_code,
        list(response.headers.raw),
        body,
        response.extensions.get("http_version", b"HTTP/1.1"),
        response.extensions.get("reason_phrase", b""),
    )


def _live(response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> Any:
    return httpx.Response(
        response.status_code,
        headers=response.headers.raw,
        stream=stream,
        extensions=dict(response.extensions),
    )


class _RestSync(httpx.SyncByteStream):
    def __init__(self, head: list[bytes], rest: Iterator[bytes], source: Any) -> None:
        self._head, self._rest, self._source = head, rest, source

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest

    def close(self) -> None:
        self._source.close()


class _RestAsync(httpx.AsyncByteStream):
    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes], source: Any) -> None:
        self._head, self._rest, self._source = head, rest, source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._source.aclose()


def _announced_too_large(request: httpx.Request, response: httpx.Response, limit: int) -> bool:
    length = _content_length(response)  # a HEAD answer announces a body it does not send
    return request.method != "HEAD" and length is not None and length > limit


def read_sync(request: httpx.Request, response: httpx.Response, limit: int) -> Captured:
    """Read the whole body, up to ``limit`` bytes; past it raise ``TooLarge``."""

    if _announced_too_large(request, response, limit):
        raise TooLarge(response, limit)
    head: list[bytes] = []
    size = 0
    try:
        chunks = iter(response.stream)  # type: ignore[arg-type]
        for chunk in chunks:
            head.append(chunk)
            size += len(chunk)
            if size > limit:
                live = _live(response, _RestSync(head, chunks, response.stream))
                raise TooLarge(live, limit)
    except TooLarge:
        raise
    except BaseException:
        response.close()
        raise
    response.close()
    return _captured(response, b"".join(head))


async def read_async(request: httpx.Request, response: httpx.Response, limit: int) -> Captured:
    """``read_sync``'s twin for an async inner transport."""
    if _announced_too_large(request, response, limit):
        raise TooLarge(response, limit)
    head: list[bytes] = []
    size = 0
    try:
        chunks = aiter(response.stream)  # type: ignore[arg-type]
        async for chunk in chunks:
            head.append(chunk)
            size += len(chunk)
            if size > limit:
                live = _live(response, _RestAsync(head, chunks, response.stream))
                raise TooLarge(live, limit)
    except TooLarge:
        raise
    except BaseException:
        await response.aclose()
        raise
    await response.aclose()
    return _captured(response, b"".join(head))
