"""What the entry points share: the process-wide default ``Dedup`` and the choice between
failing closed and failing open when Redis is unreachable (``on_redis_error``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from dedupcall.core import Dedup
from dedupcall.errors import ConfigError, RedisUnavailable

log = logging.getLogger("dedupcall")

#: After Redis failed a call, bypassing entry points skip it for this many seconds, so
#: every call does not pay a connection timeout while Redis is down.
BYPASS_COOLDOWN = 1.0

_default: Dedup | None = None
_default_lock = threading.Lock()


def checked(dedup: Dedup | None) -> Dedup | None:
    """``dedup`` if it is a ``Dedup`` or None (use the default), else ``ConfigError``."""
    if dedup is not None and not isinstance(dedup, Dedup):
        raise ConfigError(f"dedup must be a Dedup, got {type(dedup).__name__}")
    return dedup


def configure(dedup: Dedup | None = None, /, **options: Any) -> Dedup:
    """Set the process-wide ``Dedup`` used where an entry point is given none.

    Pass a ``Dedup``, or the arguments of one (``url=``, ``namespace=``, config); with
    neither, it is built from the environment (``Dedup.from_env()``). Returns it.
    """
    global _default
    if dedup is not None and options:
        raise ConfigError("configure() takes a Dedup or its arguments, not both")
    checked(dedup)
    if dedup is None:
        dedup = Dedup(**options) if "url" in options else Dedup.from_env(**options)
    with _default_lock:
        _default = dedup
    return dedup


def default_dedup() -> Dedup:
    """The process-wide ``Dedup``: the one given to ``configure``, else one created once
    from the environment (``REDIS_URL`` or ``REDIS_HOST``...); ``ConfigError`` if none."""
    global _default
    with _default_lock:
        if _default is None:
            try:
                _default = Dedup.from_env()
            except ConfigError as exc:
                raise ConfigError(
                    f"no Dedup given and no default: pass dedup=, call "
                    f"dedupcall.configure(...), or set REDIS_URL ({exc})"
                ) from exc
        return _default


def current_default() -> Dedup | None:
    """The process-wide ``Dedup`` if one exists already (none is built)."""
    return _default


def reset_default() -> None:
    """Forget the default ``Dedup`` (it is not closed); for tests."""
    global _default
    with _default_lock:
        _default = None


class RedisErrorPolicy:
    """``on_redis_error``: ``"raise"`` (fail closed: ``RedisUnavailable``) or ``"bypass"``
    (fail open: call the upstream directly, logged and counted as ``bypassed``)."""

    def __init__(self, mode: str) -> None:
        if mode not in ("raise", "bypass"):
            raise ConfigError(f"on_redis_error must be 'raise' or 'bypass', got {mode!r}")
        self.mode = mode
        self._skip_until = 0.0

    def skip(self, dedup: Dedup) -> bool:
        """True while a recent failure says Redis is down: go straight to the upstream."""
        if self.mode == "bypass" and time.monotonic() < self._skip_until:
            dedup.count("bypassed")
            return True
        return False

    def failed(self, dedup: Dedup, exc: RedisUnavailable, what: str | bytes) -> None:
        """Redis failed ``what``: re-raise when failing closed, else note the bypass."""
        if self.mode == "raise":
            raise exc
        self._skip_until = time.monotonic() + BYPASS_COOLDOWN
        dedup.count("bypassed")
        shown = dedup.shown_key(what)  # secrets in the key redacted
        log.warning(
            "dedupcall bypassed for %r: Redis unavailable (%s)",
            shown,
            exc,
            extra={"key": shown, "instance_id": dedup.instance_id},
        )
