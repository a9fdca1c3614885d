"""Automatic pipelining: while a command is on its way, the commands issued meanwhile
leave together as one pipeline (one connection, one write, one read loop), so many
concurrent callers share a few connections and pay the client's per-command overhead
once per batch. A lone command goes straight out: batching never adds latency to it.

A caller that is cancelled only stops waiting: the batch is never cancelled half-way,
so no connection is left with unread replies (redis-py CVE-2023-28858's lesson).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError

MAX_BATCH = 256


class Batcher:
    """Queue commands; flush them together at the end of the current loop turn, with at
    most ``max_inflight`` batches on their way (so at most that many connections)."""

    def __init__(self, client: Redis, *, lone: Redis | None = None, max_inflight: int = 8) -> None:
        self._client = client
        self._lone = lone or client  # a dedicated connection for lone commands, if given
        self._max_inflight = max_inflight
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._direct = 0  # lone commands on their way

    async def execute(self, *args: Any) -> Any:
        """Send ``args`` as one command and return its reply (or raise its error)."""
        if not self._direct and not self._pending and not self._sending:
            self._direct += 1
            try:
                return await self._send_lone(args)
            finally:
                self._direct -= 1
        return await self._enqueue(args)

    async def _send_lone(self, args: tuple[Any, ...]) -> Any:
        conn = self._lone.connection
        if conn is not None:  # as a pool does on checkout: reconnect a dead socket
            await self._lone.connection_pool.ensure_connection(conn)
        try:
            return await self._lone.execute_command(*args)  # type: ignore[no-untyped-call]
        except ConnectionError:
            # The kept connection died under us (a restart, a failover): once more on a
            # fresh one (the failure disconnected it). Every command sent here is safe to
            # repeat: a repeated submit joins its own flight, a repeated completion is
            # refused and returns the stored result.
            return await self._lone.execute_command(*args)  # type: ignore[no-untyped-call]

    def _enqueue(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and len(self._sending) < self._max_inflight:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._pending and not self._scheduled:  # what queued meanwhile goes next
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _pipeline(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> Any:
        pipe = self._client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        return await pipe.execute(raise_on_error=False)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            try:
                replies = await self._pipeline(batch)
            except ConnectionError:
                # A pooled connection the server closed (a restart, a failover): its idle
                # siblings are as stale, so drop them, then send once more on a fresh one.
                # Safe to repeat, as for lone commands (see _send_lone).
                await self._client.connection_pool.disconnect(inuse_connections=False)
                replies = await self._pipeline(batch)
        except BaseException as exc:  # the connection failed: every command in it did
            for _, future in batch:
                _settle(future, error=exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                _settle(future, error=reply)
            else:
                _settle(future, value=reply)


def _settle(
    future: asyncio.Future[Any], *, value: Any = None, error: BaseException | None = None
) -> None:
    if future.done():
        return  # its caller stopped waiting
    if error is None:
        future.set_result(value)
        return
    future.set_exception(error if isinstance(error, Exception) else ConnectionError(str(error)))
    future.exception()  # retrieved: a caller that left must not cause an asyncio warning
