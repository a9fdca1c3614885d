"""Loads the Lua scripts once and binds them to a client (EVALSHA, reloaded after NOSCRIPT)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError

from dedupcall.batch import Batcher
from dedupcall.config import BOUNDS, PRIORITY_LIMIT, SHARED_FIELDS

NAMES = (
    "submit",
    "complete",
    "retry",
    "renew",
    "release",
    "leave",
    "reap",
    "init",
    "retire",
    "clear",
    "reclaim",
    "recover",
)


def _header() -> str:
    """Lua constants rendered from ``config.py``, so the scripts read shared settings by
    the very bounds Python validates them with."""
    rows = []
    for name in SHARED_FIELDS:
        b = BOUNDS[name]
        low = 0 if name == "max_concurrent" else b.low  # 0 stored: no limit
        rows.append(f"{{'{name}', {low!r}, {b.high!r}, {'true' if b.integer else 'false'}}}")
    return (
        "-- rendered from dedupcall/config.py\n"
        f"local SHARED = {{ {', '.join(rows)} }}\n"
        f"local PRIORITY_LIMIT = {PRIORITY_LIMIT}\n"
    )


@cache
def source(name: str) -> str:
    """The full source of one script: the rendered header, ``lib.lua``, the script."""
    folder = resources.files("dedupcall") / "lua"
    lib = (folder / "lib.lua").read_text()
    return _header() + lib + "\n" + (folder / f"{name}.lua").read_text()


class Scripts:
    """The scripts bound to one client. Each attribute is an awaitable script call.

    redis-py's ``AsyncScript`` sends EVALSHA and, on NOSCRIPT (after a restart, failover
    or ``SCRIPT FLUSH``), loads the source and retries once.
    """

    def __init__(self, client: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source(name)) for name in NAMES
        }

    async def load(self, client: Redis) -> None:
        """Load every script up front (one round trip), so no call pays a NOSCRIPT retry."""
        pipe = client.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.script_load(script.script)
        await pipe.execute()

    async def run(self, name: str, keys: list[str], args: list[Any], client: Redis) -> Any:
        """Run script ``name`` with ``keys`` and ``args`` on ``client``; reloaded after
        NOSCRIPT, and sent once more after a connection the server had closed."""
        try:
            return await self._scripts[name](keys=keys, args=args, client=client)
        except ConnectionError:
            # Its idle siblings are as stale (a restart, a failover): drop them first.
            await client.connection_pool.disconnect(inuse_connections=False)
            return await self._scripts[name](keys=keys, args=args, client=client)

    async def run_batched(
        self, name: str, keys: list[str], args: list[Any], batcher: Batcher
    ) -> Any:
        """Run script ``name`` in the next automatic pipeline; after NOSCRIPT (a restart,
        a failover, SCRIPT FLUSH) load it and run it again, through the batcher too."""
        script = self._scripts[name]
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await batcher.execute(*command)
        except NoScriptError:
            await batcher.execute("SCRIPT", "LOAD", script.script)
            return await batcher.execute(*command)
