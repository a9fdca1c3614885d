"""Pure encoding: results and request payloads to and from JSON bytes, and key digests.

Nothing here touches Redis. Only JSON crosses Redis: no pickled objects, no import paths.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

from dedupcall.errors import SerializationError

KINDS = ("function", "request", "transport")


def dumps(value: Any, *, what: str) -> bytes:
    """Strict JSON (no NaN/Infinity); else ``SerializationError`` naming ``what``."""
    try:
        return json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from exc


def loads(raw: bytes | str) -> Any:
    """Parse JSON bytes read from Redis; malformed data raises ``ValueError``."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from exc


def readable_key(key: str | bytes) -> str:
    """The key as text for humans; bytes that are not UTF-8 are escaped, not lost. Text
    that is not valid Unicode (a lone surrogate) is the caller's ``SerializationError``."""
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    if not isinstance(key, str):
        raise SerializationError(f"a key must be str or bytes, got {type(key).__name__}")
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"key {key[:80]!r} is not valid Unicode text ({exc.reason} at position "
                f"{exc.start}); pass bytes for binary keys"
            ) from None
    return key


def key_digest(kind: str, key: str | bytes, partition: str = "") -> str:
    """Fixed-length name part for a key: the three kinds never share a flight, nor two
    partitions (a transport's credentials) of one key."""
    raw = key if isinstance(key, bytes) else readable_key(key).encode()
    if partition:
        raw += b"\x00" + partition.encode()
    return hashlib.sha256(kind.encode() + b"\x00" + raw).hexdigest()[:32]


def digest(data: bytes) -> str:
    """A short digest of bytes (bodies): never the bytes themselves."""
    return hashlib.sha256(data).hexdigest()[:32]


def credential_digest(
    headers: Iterable[tuple[str, str]], names: Collection[str], secret: str | None
) -> str:
    """A keyed digest of the credential-bearing headers among ``headers`` (``names``,
    lower-case), ``""`` when there are none. Keyed with ``secret`` where one is configured,
    so a short API key cannot be recovered by guessing from what Redis holds."""
    found = sorted(
        ((name.lower(), value) for name, value in headers if name.lower() in names),
        key=lambda item: item[0],  # repeated names keep their order
    )
    if not found:
        return ""
    return keyed_digest("\n".join(f"{name}:{value}" for name, value in found), secret)


def vary_digest(
    headers: Iterable[tuple[str, str]], names: Collection[str], secret: str | None
) -> str:
    """A keyed digest of the values of the request headers ``names`` (a response's
    ``Vary``), absent ones included; two requests match when their digests are equal
    (whitespace and repeated lines normalised, as RFC 9111 §4.1 allows)."""
    if not names:
        return ""
    values: dict[str, list[str]] = {name.lower(): [] for name in names}
    for name, value in headers:
        if name.lower() in values:
            values[name.lower()].append(",".join(v.strip() for v in value.split(",")))
    text = "\n".join(f"{name}:{','.join(v)}" for name, v in sorted(values.items()))
    return keyed_digest(text, secret)


def keyed_digest(data: str | bytes, secret: str | None) -> str:
    """HMAC-SHA256 of ``data`` under ``secret`` (a fixed key without one), shortened."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    key = secret.encode() if secret else b"dedupcall"
    return hmac.new(key, raw, hashlib.sha256).hexdigest()[:32]


_QUERY_ITEM = re.compile(r"([?&;#])([^=&;#\s]+)=([^&;#\s]*)")
# Everything between "scheme://" and the last "@" before the path: a user name can be a
# token too (https://<token>@host), and a password may hold an "@".
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


def redact_secrets(text: str, names: Collection[str]) -> str:
    """``text`` with the values of secret query (and fragment) parameters (``names``,
    compared without case) and a URL's user information replaced by ``***``: what
    readable keys, logs, the status page and stored records show."""
    if "=" not in text and "@" not in text:
        return text  # the hot path: nothing that could hold a secret

    def hide(match: re.Match[str]) -> str:
        name = unquote_plus(match[2]).lower()
        return f"{match[1]}{match[2]}=***" if name in names else match[0]

    return _USERINFO.sub(r"\1***@", _QUERY_ITEM.sub(hide, text))


def result_record(
    *,
    ok: bool,
    request_id: str,
    key: str,
    kind: str,
    attempts: int,
    executed_by: str | None,
    data: Any = None,
    error_type: str | None = None,
    message: str | None = None,
    status_code: int | None = None,
    share: dict[str, Any] | None = None,
) -> bytes:
    """Encode a flight's result. ``data`` must be JSON-serializable; ``share`` says who
    may receive an HTTP answer (``httpcache.Sharing.record``; None: anyone)."""
    record: dict[str, Any] = {
        "ok": ok,
        "id": request_id,
        "key": key,
        "kind": kind,
        "att": attempts,
        "by": executed_by,
        "status": status_code,
    }
    if ok:
        record["data"] = data
    else:
        record["err"] = {"type": error_type or "Error", "msg": message or ""}
        if data is not None:
            record["data"] = data
    if share is not None:
        record["share"] = share
    return dumps(record, what=f"the result for {key!r}")


def decode_record(raw: bytes | str) -> dict[str, Any]:
    """Decode a stored result; a malformed one raises ``ValueError``."""
    record = loads(raw)
    if not isinstance(record, dict) or not isinstance(record.get("ok"), bool):
        raise ValueError("stored result is not a result record")
    return record


# --- queued HTTP requests -------------------------------------------------------------


def encode_body(body: Any) -> dict[str, Any] | None:
    """A request body as a JSON-safe dict: JSON values as-is, bytes/str as base64 content."""
    if body is None:
        return None
    if isinstance(body, (bytes, bytearray, memoryview)):
        return {"content": base64.b64encode(bytes(body)).decode()}
    if isinstance(body, str):
        return {"content": base64.b64encode(body.encode()).decode()}
    dumps(body, what="the request body")
    return {"json": body}


def body_bytes(body: Mapping[str, Any] | None) -> bytes:
    """The bytes that will be sent for an encoded body (for the conflict fingerprint)."""
    if body is None:
        return b""
    if "content" in body:
        return base64.b64decode(body["content"])
    return dumps(body["json"], what="the request body")


def request_fingerprint(method: str, url: str, body: Mapping[str, Any] | None) -> str:
    """What makes two queued requests "the same request" for the conflict check, besides
    their credentials (``credential_digest``), which are compared apart: never waived."""
    parts = [method.upper(), url, digest(body_bytes(body))]
    return digest("\x00".join(parts).encode("utf-8", "surrogateescape"))


def encode_request(
    method: str, url: str, headers: Mapping[str, str], body: Mapping[str, Any] | None
) -> bytes:
    """The payload a worker needs to send a queued request."""
    return dumps(
        {"method": method.upper(), "url": url, "headers": dict(headers), "body": body},
        what="the request",
    )


def decode_request(raw: bytes | str) -> tuple[str, str, dict[str, str], dict[str, Any] | None]:
    """Parse and check a stored request payload; anything malformed raises ``ValueError``."""
    payload = loads(raw)
    if not isinstance(payload, dict):
        raise ValueError("request payload is not an object")
    method, url = payload.get("method"), payload.get("url")
    headers, body = payload.get("headers") or {}, payload.get("body")
    if (
        not isinstance(method, str)
        or not isinstance(url, str)
        or not url.lower().startswith(("http://", "https://"))
    ):
        raise ValueError("request payload has no valid method and http(s) url")
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError("request headers must be an object of strings")
    if body is not None and not (isinstance(body, dict) and ("json" in body or "content" in body)):
        raise ValueError("request body is malformed")
    return method, url, headers, body


# --- httpx responses (transport flights) -----------------------------------------------


def encode_response(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    http_version: bytes = b"HTTP/1.1",
    reason: bytes = b"",
) -> dict[str, Any]:
    """A response as JSON data: header bytes as latin-1 text (lossless), body as base64."""
    return {
        "status": status,
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers],
        "body": base64.b64encode(body).decode(),
        "http_version": http_version.decode("latin-1"),
        "reason": reason.decode("latin-1"),
    }


def decode_response(data: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes, bytes, bytes]:
    """Inverse of ``encode_response``: status, raw headers, body, http version, reason.
    Malformed data raises ``ValueError``."""
    try:
        status = data["status"]
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in data["headers"]]
        body = base64.b64decode(data["body"], validate=True)
        version = str(data.get("http_version") or "HTTP/1.1").encode("latin-1")
        reason = str(data.get("reason") or "").encode("latin-1")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"stored response is malformed: {type(exc).__name__}: {exc}") from None
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 999:
        raise ValueError(f"stored response has no valid status: {status!r}")
    return status, headers, body, version, reason
