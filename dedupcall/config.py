"""Configuration: defaults, validation, environment and URL parsing, a secret-safe repr.

Shared settings (``SHARED_FIELDS``) live in Redis once seeded, so ``update_config``
changes every instance at once; the rest are local to one ``Dedup`` object.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from redis.asyncio.connection import parse_url

from dedupcall.errors import ConfigError

#: Settings stored in Redis and shared by every instance of a namespace.
SHARED_FIELDS = (
    "max_concurrent",
    "max_retries",
    "retry_delay",
    "lock_timeout",
    "result_ttl",
    "retention",
)

#: Priorities are packed with a FIFO sequence into one exact double (< 2**53).
PRIORITY_LIMIT = 1_000_000

#: Request headers that carry credentials. Requests whose values differ never share an
#: answer; only a keyed digest of them ever reaches Redis, and none reaches a readable key.
CREDENTIAL_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "x-auth-token",
    "x-amz-security-token",
)

#: URL query parameters whose values are secrets: shown as ``***`` in readable keys, logs,
#: the status page, the CLI and stored records (the key's digest still tells them apart).
SECRET_PARAMS = (
    "api_key",
    "apikey",
    "key",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "signature",
    "sig",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "x-amz-signature",
    "x-amz-security-token",
    "x-goog-signature",
    "x-api-key",
)

DAY = 86_400.0
YEAR = 365 * DAY


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take. Every ms value derived from them stays far
    below 10**14, so Lua prints it as plain digits (never ``1e+14``)."""

    low: float
    high: float
    integer: bool = False


#: The one table of limits: Python validates every write against it, and the Lua scripts
#: read shared settings from Redis through the same table (``scripts.py`` renders it), so
#: what status reports is what the scripts enforce.
BOUNDS: dict[str, Bounds] = {
    "max_concurrent": Bounds(1, 1_000_000, integer=True),  # None (stored as 0): no limit
    "max_retries": Bounds(0, 1000, integer=True),
    "retry_delay": Bounds(0, 3600),
    "lock_timeout": Bounds(0.05, DAY),
    "result_ttl": Bounds(0.001, YEAR),
    "retention": Bounds(0.001, YEAR),
    "execution_timeout": Bounds(0.001, 7 * DAY),
    "drain_timeout": Bounds(0.001, DAY),
    "heartbeat_interval": Bounds(0.01, 60),
    "poll_interval": Bounds(0.01, 3600),
    "max_connections": Bounds(2, 10_000, integer=True),
    "socket_timeout": Bounds(0.001, 3600),
    "timeout": Bounds(0.001, YEAR),  # a caller's wait
    "refresh": Bounds(0.1, 3600),  # the status page's refresh
}

#: How a shared setting is written in Redis: plain digits, as both sides parse them.
_STORED_NUMBER = re.compile(r"[0-9]{1,16}(\.[0-9]{1,6})?")


@dataclass(frozen=True)
class Config:
    """Validated settings of one ``Dedup``. Seconds are floats; ``None`` means no limit.

    ``credential_headers`` and ``secret_params`` name what is never shown or shared;
    ``key_secret`` keys the digest of credentials (never printed).
    """

    max_concurrent: int | None = 100
    max_retries: int = 3
    retry_delay: float = 1.0
    lock_timeout: float = 30.0
    result_ttl: float = 3600.0
    retention: float = 3600.0
    execution_timeout: float = 60.0
    drain_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    poll_interval: float = 2.0
    max_connections: int = 32
    socket_timeout: float = 5.0
    credential_headers: tuple[str, ...] = CREDENTIAL_HEADERS
    secret_params: tuple[str, ...] = SECRET_PARAMS
    key_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("credential_headers", "secret_params"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        if self.key_secret is not None and (
            not isinstance(self.key_secret, str) or len(self.key_secret) < 16
        ):
            raise ConfigError("key_secret must be a string of at least 16 characters")
        validate({f.name: getattr(self, f.name) for f in fields(self) if f.name in BOUNDS})

    def with_values(self, **values: Any) -> Config:
        """Return a copy with ``values`` applied (validated)."""
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return replace(self, **values)

    def shared(self) -> dict[str, Any]:
        """The settings that live in Redis."""
        return {name: getattr(self, name) for name in SHARED_FIELDS}


def _names(what: str, value: Any) -> tuple[str, ...]:
    """A collection of header or parameter names, lower-cased; else ``ConfigError``."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (tuple, list, set, frozenset)) or not all(
        isinstance(v, str) and v and v.isascii() and v.isprintable() for v in value
    ):
        raise ConfigError(f"{what} must be a collection of names, got {value!r}")
    return tuple(sorted({v.lower() for v in value}))


def validate(values: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` unless every given numeric setting is within ``BOUNDS``."""
    for name, value in values.items():
        bounds = BOUNDS.get(name)
        if bounds is None:
            raise ConfigError(f"unknown numeric setting {name!r}")
        if name == "max_concurrent" and value is None:
            continue
        kind = "an int" if bounds.integer else "a number of seconds"
        if (
            isinstance(value, bool)
            or not isinstance(value, int if bounds.integer else (int, float))
            or not math.isfinite(value)
            or not bounds.low <= value <= bounds.high
        ):
            extra = " or None" if name == "max_concurrent" else ""
            raise ConfigError(
                f"{name} must be {kind} in {_num(bounds.low)}..{_num(bounds.high)}{extra}, "
                f"got {value!r}"
            )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


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
    """Shared settings as Redis hash fields: plain digits, at most 6 decimals
    (``max_concurrent=None`` is stored as 0)."""
    out = {}
    for name, value in values.items():
        if name == "max_concurrent":
            out[name] = str(value or 0)
        elif BOUNDS[name].integer:
            out[name] = str(int(value))
        else:
            out[name] = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return out


def decode_field(name: str, raw: Any) -> Any:
    """One stored shared setting, read by the rules the scripts use (``BOUNDS``); raises
    ``ConfigError`` when it is missing or malformed (the scripts then refuse to run)."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    if not isinstance(text, str) or not _STORED_NUMBER.fullmatch(text):
        raise ConfigError(f"shared setting {name} is stored as {text!r}, not a number")
    bounds = BOUNDS[name]
    if name == "max_concurrent" and text == "0":
        return None
    if bounds.integer:
        if "." in text:
            raise ConfigError(f"shared setting {name} is stored as {text!r}, not an int")
        value: Any = int(text)
    else:
        value = float(text)
    validate({name: value})
    return value


def decode_shared(raw: Mapping[Any, Any]) -> tuple[dict[str, Any], list[str]]:
    """The valid shared settings in a config hash read from Redis, and the names of those
    missing or malformed there (which the scripts refuse to run without)."""
    by_name = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    out: dict[str, Any] = {}
    bad = []
    for name in SHARED_FIELDS:
        try:
            out[name] = decode_field(name, by_name.get(name))
        except ConfigError:
            bad.append(name)
    return out, bad


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
    if name in ("credential_headers", "secret_params"):
        return _names(name, text)
    if name == "key_secret":
        return text
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


URL_SECRET_PARAMS = ("password", "sentinel_password")


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
    query = [(k, "***" if k in URL_SECRET_PARAMS else v) for k, v in parse_qsl(parts.query)]
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
