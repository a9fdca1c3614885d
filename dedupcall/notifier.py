"""The one subscriber connection of a ``Dedup``, fanned out to local waiters.

It listens on the namespace's ``done`` channel (a flight finished), this instance's own
channel (a grant pushed to it) and the control channel (shared config changed). Pub/sub
is at-most-once, so on every (re)subscribe the owner re-checks what it waits for, and
recently finished ids are remembered briefly: a waiter that learns its flight id just
after the flight finished still sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from dedupcall.aio import stop_task
from dedupcall.keys import KeySpace
from dedupcall.models import Grant

log = logging.getLogger("dedupcall")

RECENT_DONE = 4096
IDLE_PING = 5.0


class Notifier:
    """Owns the subscriber connection; calls back on grants, control messages, reconnects."""

    def __init__(
        self,
        client: Redis,
        keys: KeySpace,
        instance_id: str,
        *,
        on_grant: Callable[[Grant], None],
        on_control: Callable[[str], None],
        on_resubscribe: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._client = client
        self._channels = [
            keys.done_channel,
            keys.instance_channel(instance_id),
            keys.control_channel,
        ]
        self._done_channel = keys.done_channel.encode()
        self._grant_channel = keys.instance_channel(instance_id).encode()
        self._on_grant = on_grant
        self._on_control = on_control
        self._on_resubscribe = on_resubscribe
        self._watchers: dict[str, set[asyncio.Future[bytes | None]]] = {}
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        # How the first subscription went: a start fails fast (e.g. NOPERM on channels)
        # instead of waiting out a timeout; later failures only reconnect.
        self.first_subscribe: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reconnects = 0
        self._down = False  # the connection was lost
        self._unreachable = False  # ...and a reconnection failed: Redis went away

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dedupcall-notifier")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        for futures in self._watchers.values():
            for fut in futures:
                if not fut.done():
                    fut.cancel()
        self._watchers.clear()

    # --- waiters -------------------------------------------------------------------
    def watch(self, request_id: str) -> asyncio.Future[bytes | None]:
        """A future resolved when ``request_id`` finished (at once if it just did): with
        the result when it rode in the push, ``b""`` when it is to be read from Redis, or
        ``None`` when nothing is known and the waiter should simply look again."""
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if request_id in self._recent:
            fut.set_result(self._recent[request_id])
        else:
            self._watchers.setdefault(request_id, set()).add(fut)
        return fut

    def unwatch(self, request_id: str, fut: asyncio.Future[bytes | None]) -> None:
        futures = self._watchers.get(request_id)
        if futures is not None:
            futures.discard(fut)
            if not futures:
                del self._watchers[request_id]

    def mark_done(self, request_id: str, result: bytes = b"") -> None:
        """Wake every waiter of ``request_id`` and remember it briefly."""
        self._recent[request_id] = result
        if len(self._recent) > RECENT_DONE:
            self._recent.popitem(last=False)
        for fut in self._watchers.pop(request_id, ()):
            if not fut.done():
                fut.set_result(result)

    def wake_all(self) -> None:
        """Wake every waiter to look again (after a reconnect a push may have been lost)."""
        watchers, self._watchers = self._watchers, {}
        for futures in watchers.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    # --- connection loop -----------------------------------------------------------
    async def _run(self) -> None:
        delay = 0.05
        while True:
            pubsub = self._client.pubsub()
            try:
                await self._subscribe(pubsub)
                delay = 0.05
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any connection failure: reconnect, never die
                self._unreachable = self._unreachable or self._down
                self._down = True
                if not self.first_subscribe.done():
                    self.first_subscribe.set_exception(exc)
                    self.first_subscribe.exception()  # retrieved: the starter may be gone
                self.reconnects += 1
                log.warning("dedupcall subscriber lost its connection (%s); reconnecting", exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    async def _subscribe(self, pubsub: PubSub) -> None:
        await pubsub.subscribe(*self._channels)
        pending = {c.encode() for c in self._channels}
        deadline = time.monotonic() + 10.0
        while pending:
            if time.monotonic() > deadline:
                raise ConnectionError("no subscribe confirmation within 10 s")
            msg = await pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                pending.discard(msg["channel"])
            else:
                self._dispatch(msg)
        if not self.first_subscribe.done():
            self.first_subscribe.set_result(None)
        unreachable, self._down, self._unreachable = self._unreachable, False, False
        # Messages published while we were not subscribed are lost: re-check now.
        await self._on_resubscribe(unreachable)

    async def _listen(self, pubsub: PubSub) -> None:
        last_rx = time.monotonic()
        pinged = False
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if msg is not None:
                last_rx, pinged = now, False
                self._dispatch(msg)
                continue
            if now - last_rx > 2 * IDLE_PING:
                raise ConnectionError("subscriber connection silent (no pong)")
            if now - last_rx > IDLE_PING and not pinged:
                await pubsub.ping()
                pinged = True

    def _dispatch(self, msg: dict[str, object]) -> None:
        if msg.get("type") != "message":
            return
        channel, data = msg["channel"], msg["data"]
        assert isinstance(data, bytes)
        if channel == self._done_channel:
            request_id, _, result = data.partition(b" ")
            self.mark_done(request_id.decode("utf-8", "replace"), result)
            return
        text = data.decode("utf-8", "replace")
        if channel == self._grant_channel:
            parts = text.split(" ")
            try:
                if len(parts) != 7 or parts[0] != "g":
                    raise ValueError("not a grant")
                grant = Grant.from_reply(parts[1:])
            except ValueError:
                # Never fatal: the grant's lease runs out and the sweep hands it on.
                log.warning("dedupcall ignored a malformed grant message %r", text[:200])
                return
            self._on_grant(grant)
        else:
            self._on_control(text)
