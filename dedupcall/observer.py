"""Observer: look at and steer a namespace without being one of its instances.

The CLI and ``dedupcall status --serve`` use it: it sends no heartbeat, runs no worker and
is never granted a flight, so inspecting a system does not change who runs what. A
``Dedup`` answers the same four calls, so either can back the status page.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from dedupcall import status
from dedupcall.config import (
    Config,
    check_shared,
    check_url,
    decode_shared,
    encode_shared,
    redact,
)
from dedupcall.keys import KeySpace
from dedupcall.models import QueueItem, QueueStatus
from dedupcall.store import Store

# Not this process's DEDUPCALL_* values: an observer shows the namespace, not itself.
DEFAULT_SHARED = Config().shared()


class Observer:
    """A read-and-steer client of one namespace (``async with Observer(url, ns) as o``).

    Connections open on first use; ``aclose()`` closes them. Raises ``RedisUnavailable``
    when Redis cannot be reached and ``ConfigError`` for a bad URL or setting.
    """

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", namespace: str = "dedupcall", **config: Any
    ) -> None:
        self.url = check_url(url)
        keys = KeySpace(namespace)  # validates it
        self.namespace = namespace
        self.config = Config().with_values(**config)
        self.observer_id = f"observer:{socket.gethostname()}:{os.getpid()}"
        self.store = Store(self.url, keys, self.observer_id, self.config)

    def __repr__(self) -> str:
        return f"Observer(url={redact(self.url)!r}, namespace={self.namespace!r})"

    async def __aenter__(self) -> Observer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (idempotent)."""
        await self.store.close()

    async def get_queue_status(self) -> QueueStatus:
        """Queue length, running and delayed counts, live instances with their numbers,
        and the shared config (the library's defaults where the namespace has set none)."""
        return (await status.queue_status(self.store, DEFAULT_SHARED))[0]

    async def get_queue_items(self, limit: int | None = None) -> list[QueueItem]:
        """Unfinished flights (at most ``limit`` per state): running, queued, delayed."""
        return await status.all_items(self.store, limit)

    async def clear_queue(self) -> int:
        """Remove every queued and delayed flight (their waiters get ``QueueCleared``);
        running ones finish. Returns how many were removed."""
        total = 0
        while n := await self.store.clear_batch(500):
            total += n
        return total

    async def shared_config(self) -> dict[str, Any]:
        """The namespace's shared config: what Redis holds, defaults for the rest."""
        return {**DEFAULT_SHARED, **decode_shared(await self.store.shared_config())[0]}

    async def update_config(self, **values: Any) -> None:
        """Change shared config for every instance; invalid values raise ``ConfigError``
        and change nothing."""
        check_shared(values)
        await self.store.write_shared_config(encode_shared(values))
