"""Configuration: defaults, validation, environment and URL parsing, a secret-safe repr.

Shared settings (``SHARED_FIELDS``) live in Redis once seeded, so ``update_config``
changes every instance at once; the rest are local to one ``Dedup`` object.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from redis.asyncio.connection import parse_url

from dedupcall.errors import ConfigError

#: Settings stored in Redis and shared by every instance of a namespace.
SHARED_FIELDS = ("max_concurrent", "max_retries", "retry_delay", "lock_timeout", "result_ttl")

#: Priorities are packed with a FIFO sequence into one exact double (< 2**53).
PRIORITY_LIMIT = 1_000_000


@dataclass(frozen=True)
class Config:
    """Validated settings of one ``Dedup``. Seconds are floats; ``None`` means no limit."""

    max_concurrent: int | None = 100
    max_retries: int = 3
    retry_delay: float = 1.0
    lock_timeout: float = 30.0
    result_ttl: float = 3600.0
    execution_timeout: float = 60.0
    retention: float = 3600.0
    drain_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    poll_interval: float = 2.0
    max_connections: int = 32
    socket_timeout: float = 5.0

    def __post_init__(self) -> None:
        validate(asdict(self))

    def with_values(self, **values: Any) -> Config:
        """Return a copy with ``values`` applied (validated)."""
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return replace(self, **values)

    def shared(self) -> dict[str, Any]:
        """The settings that live in Redis."""
        return {name: getattr(self, name) for name in SHARED_FIELDS}


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def validate(values: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` unless every given setting is valid."""
    for name, value in values.items():
        if name == "max_concurrent":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"max_concurrent must be an int >= 1 or None, got {value!r}")
        elif name == "max_retries":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
                raise ConfigError(f"max_retries must be an int in 0..1000, got {value!r}")
        elif name == "max_connections":
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"max_connections must be an int >= 2, got {value!r}")
        elif name == "retry_delay":
            _positive(name, value, allow_zero=True)
        else:
            _positive(name, value)
    lease = values.get("lock_timeout")
    if lease is not None and lease < 0.05:
        raise ConfigError(f"lock_timeout must be at least 0.05 s, got {lease!r}")


def validate_priority(priority: Any) -> int:
    """Return ``priority`` if it is an int within +-PRIORITY_LIMIT, else raise ``ConfigError``."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"priority must be an int, got {priority!r}")
    if not -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT:
        raise ConfigError(f"priority must be within +-{PRIORITY_LIMIT}, got {priority}")
    return priority


def validate_call(priority: Any, ttl: Any, timeout: Any) -> None:
    """Per-call options: ``priority`` (see ``validate_priority``), ``ttl`` and ``timeout``
    (seconds > 0, or None); else ``ConfigError``."""
    validate_priority(priority)
    if ttl is not None:
        validate({"result_ttl": ttl})
    if timeout is not None:
        validate({"timeout": timeout})


def encode_shared(values: Mapping[str, Any]) -> dict[str, str]:
    """Shared settings as Redis hash fields (``max_concurrent=None`` is stored as 0)."""
    out = {}
    for name, value in values.items():
        if name == "max_concurrent":
            out[name] = str(value or 0)
        elif name == "max_retries":
            out[name] = str(int(value))
        else:
            out[name] = repr(float(value))
    return out


def decode_shared(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """Inverse of ``encode_shared``; fields that fail to parse are skipped (defaults apply)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        text = value.decode() if isinstance(value, bytes) else value
        if name not in SHARED_FIELDS:
            continue
        try:
            if name == "max_concurrent":
                out[name] = int(text) or None
            elif name == "max_retries":
                out[name] = int(text)
            else:
                out[name] = float(text)
            validate({name: out[name]})
        except (ValueError, ConfigError):
            out.pop(name, None)
    return out


def check_shared(values: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` unless ``values`` are valid shared settings only."""
    unknown = set(values) - set(SHARED_FIELDS)
    if unknown:
        raise ConfigError(
            f"not shared config option(s): {', '.join(sorted(unknown))}; "
            f"shared: {', '.join(SHARED_FIELDS)}"
        )
    validate(values)


def parse_env_value(name: str, text: str, label: str | None = None) -> Any:
    """Parse one setting given as text (a ``DEDUPCALL_*`` variable, unless ``label``
    names where it came from) by the type of its field."""
    if name not in {f.name for f in fields(Config)}:
        raise ConfigError(f"unknown config option {name!r}")
    default = getattr(Config(), name)
    # Typed by a person (the CLI, the status page): only "none" lifts the limit; the
    # environment keeps accepting "" and "0" for it as well.
    unlimited = ("none",) if label else ("", "none", "0")
    try:
        if name == "max_concurrent":
            return None if text.strip().lower() in unlimited else int(text)
        if isinstance(default, int) and not isinstance(default, bool):
            return int(text)
        return float(text)
    except ValueError as exc:
        where = label or f"DEDUPCALL_{name.upper()}"
        raise ConfigError(f"{where}={text!r} is not a valid {name}") from exc


def config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Config values given as ``DEDUPCALL_<FIELD>`` environment variables."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for f in fields(Config):
        text = env.get(f"DEDUPCALL_{f.name.upper()}")
        if text is not None:
            out[f.name] = parse_env_value(f.name, text)
    return out


def url_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``REDIS_URL``, else a URL from the original ``REDIS_HOST/PORT/PASSWORD/DB``."""
    env = os.environ if environ is None else environ
    if env.get("REDIS_URL"):
        return env["REDIS_URL"]
    if not env.get("REDIS_HOST"):
        return None
    host = env["REDIS_HOST"]
    port = env.get("REDIS_PORT") or "6379"
    db = env.get("REDIS_DB") or "0"
    if not port.isdigit() or not db.isdigit():
        raise ConfigError(f"REDIS_PORT and REDIS_DB must be integers, got {port!r} and {db!r}")
    password = env.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def check_url(url: str) -> str:
    """Validate a Redis URL's scheme (and a Sentinel URL's shape); return it unchanged."""
    try:
        scheme = urlsplit(url).scheme if isinstance(url, str) else None
    except ValueError as exc:
        raise ConfigError(f"malformed Redis URL {redact(url)!r}: {exc}") from None
    if scheme not in SCHEMES:
        raise ConfigError(
            f"Redis URL must start with one of {', '.join(s + '://' for s in SCHEMES)}, "
            f"got {redact(url) if isinstance(url, str) else url!r}"
        )
    if scheme.endswith("+sentinel"):
        parse_sentinel_url(url)
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is out of range or not a number
        path = parts.path.strip("/")
        if scheme != "unix" and path and not path.isdigit():
            raise ValueError(f"the database must be a number, got {path!r}")
        # redis-py's own parsing, so a bad query option fails here, not at the first call.
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"malformed Redis URL {redact(url)!r}: {exc}") from None
    return url


SECRET_PARAMS = ("password", "sentinel_password")


def redact(url: str) -> str:
    """The URL with every password (in the address or the query) replaced by ``***``;
    a URL too malformed to parse shows only its scheme."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"
    auth, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in auth:
        parts = parts._replace(netloc=f"{auth.split(':', 1)[0]}:***@{hosts}")
    query = [(k, "***" if k in SECRET_PARAMS else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in query)))


@dataclass(frozen=True)
class SentinelTarget:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``; the
    password is the master's; ``?sentinel_password=`` logs in to the sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a Sentinel URL; ``ConfigError`` when it is malformed."""
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    user, _, password = auth.partition(":")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(
                f"Sentinel address must be host:port, got {host!r} in {redact(url)!r}"
            )
        sentinels.append((name, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"Sentinel URL needs /<service name>[/<db>], got {redact(url)!r}")
    query = dict(parse_qsl(parts.query))
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password"),
        tls=parts.scheme.startswith("rediss"),
    )


def validate_namespace(namespace: str) -> str:
    """Namespaces become a Redis hash tag and ACL glob: only safe characters are allowed."""
    if not isinstance(namespace, str) or not 1 <= len(namespace) <= 64:
        raise ConfigError(f"namespace must be a string of 1..64 characters, got {namespace!r}")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:")
    bad = sorted(set(namespace) - allowed)
    if bad:
        raise ConfigError(
            f"namespace {namespace!r} has characters not allowed in a hash tag or ACL pattern: "
            f"{''.join(bad)!r} (use letters, digits, '_', '-', '.', ':')"
        )
    return namespace
