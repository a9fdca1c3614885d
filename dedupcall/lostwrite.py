"""Writes to a connection the peer already closed fail with ``ConnectionError``.

CPython 3.12 and 3.13 releases before the fix of python/cpython#136234 raise
``AttributeError`` (or ``TypeError``) from asyncio's selector transport instead, when
redis-py writes a command to a connection Redis has reset (a restart, a failover). No retry
and no error mapping recognises those, so a call right after a restart would fail with
them. ``guard_writes`` gives a redis-py connection class the error it should have raised.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError

_TRANSPORT_FILE = os.path.join("asyncio", "selector_events.py")
_guarded: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def lost_in_transport(exc: BaseException) -> bool:
    """Whether ``exc`` is that interpreter bug: raised inside asyncio's selector transport."""
    if not isinstance(exc, (AttributeError, TypeError)):
        return False
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.endswith(_TRANSPORT_FILE)


def guard_writes(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with ``send_packed_command`` raising ``ConnectionError`` for a lost write;
    ``cls`` itself before Python 3.12, whose transports have no ``writelines`` of their own
    (so no command pays for a guard it cannot need)."""
    if sys.version_info < (3, 12):
        return cls
    if cls not in _guarded:

        async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
            try:
                await cls.send_packed_command(self, command, check_health)
            except (AttributeError, TypeError) as exc:
                if not lost_in_transport(exc):
                    raise
                await self.disconnect(nowait=True)
                raise ConnectionError(f"connection lost while writing: {exc!r}") from exc

        _guarded[cls] = type(cls.__name__, (cls,), {"send_packed_command": send_packed_command})
    return _guarded[cls]
