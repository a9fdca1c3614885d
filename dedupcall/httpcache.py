"""Who may receive an HTTP answer, and for how long it may answer later callers.

dedupcall hands one caller's response to others, across users and instances: it is a
*shared cache* in the sense of RFC 9111, on every HTTP path (transports and queued
requests). hishel (2.x, sans-I/O) decides storability and freshness for a shared cache;
the rest is ours: every credential-bearing header counts as ``Authorization`` does,
``Set-Cookie`` answers are bound to their requester unless allowed, and a ``no-store``
or ``private`` answer still goes to joiners that provably sent the same credentials,
never to anyone else and never to a later caller.

hishel is imported on first use: a service pays for it only once it sends a request.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dedupcall import codec


@dataclass(frozen=True)
class Sharing:
    """How an answer may be shared. ``cache_ms``: how long it answers later callers (0:
    never stored). ``bound``: only callers with the same (non-empty) credentials may
    receive it. ``vary``: request headers it varies on (``"*"``: it matches nobody else),
    with ``vary_digest`` the digest of the producing request's values of them."""

    cache_ms: int
    bound: bool
    credentials: str
    vary: tuple[str, ...] = ()
    vary_digest: str = ""

    def record(self) -> dict[str, Any] | None:
        """What is stored with the answer for its consumers to check (None: anyone)."""
        if not self.bound and not self.vary:
            return None
        return {
            "bound": self.bound,
            "cred": self.credentials,
            "vary": list(self.vary),
            "vd": self.vary_digest,
        }


@functools.cache
def _hishel() -> tuple[ModuleType, ModuleType, ModuleType]:
    # hishel's public states and models, and two internal modules of its pinned minor
    # version (pyproject): freshness and directive parsing are not exported.
    import hishel
    from hishel._core import _headers, _spec

    return hishel, _spec, _headers


Headers = Iterable[tuple[str, str]]


def _hishel_headers(headers: Headers) -> Any:
    hishel, _, _ = _hishel()
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        grouped.setdefault(name.lower(), []).append(value)
    return hishel.Headers(grouped)


def decide(
    method: str,
    url: str,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    ttl_ms: int,
    *,
    credential_headers: Collection[str],
    secret: str | None,
    share_set_cookie: bool = False,
) -> Sharing:
    """The sharing of one answer by RFC 9111's rules for a shared cache. ``ttl_ms`` is
    the flight's ttl: it caps freshness, and stands in for it where the response states
    none (the heuristic freshness a cache may assign, RFC 9111 §4.2.2)."""
    hishel, _spec, hh = _hishel()
    request_headers, response_headers = list(request_headers), list(response_headers)
    credentials = codec.credential_digest(request_headers, credential_headers, secret)
    names = {name.lower() for name, _ in response_headers}
    cc = hh.parse_cache_control(_joined(response_headers, "cache-control"))
    explicitly_shared = bool(cc.public or cc.s_maxage is not None or cc.must_revalidate)
    bound = bool(
        cc.no_store
        or cc.private
        or ("set-cookie" in names and not share_set_cookie)
        or (credentials and not explicitly_shared)
    )
    vary = tuple(
        sorted({v.strip().lower() for v in _joined(response_headers, "vary").split(",") if v})
    )
    vary_digest = "*" if "*" in vary else codec.vary_digest(request_headers, vary, secret)
    if bound or "*" in vary:
        return Sharing(0, bound, credentials, vary, vary_digest)
    # hishel decides storability; credentials in any header count as Authorization.
    hreq = hishel.Request(
        method.upper(),
        url,
        _hishel_headers([*request_headers, *([("authorization", "x")] if credentials else [])]),
    )
    hresp = hishel.Response(status, _hishel_headers(response_headers))
    options = hishel.CacheOptions(shared=True, supported_methods=[method.upper()])
    state = hishel.CacheMiss(request=hreq, options=options).next(hresp)
    if isinstance(state, hishel.InvalidateEntries):
        state = state.next_state
    if not isinstance(state, hishel.StoreAndUse) or cc.no_cache:
        return Sharing(0, False, credentials, vary, vary_digest)  # needs revalidation
    return Sharing(_cache_ms(hresp, ttl_ms), False, credentials, vary, vary_digest)


def _cache_ms(response: Any, ttl_ms: int) -> int:
    hishel, spec, _ = _hishel()
    explicit = [(n, v) for n, v in _items(response.headers) if n != "last-modified"]
    lifetime = spec.get_freshness_lifetime(
        hishel.Response(response.status_code, _hishel_headers(explicit)), True
    )
    if lifetime is None:  # the response states no freshness: the flight's ttl is ours
        return max(ttl_ms, 0)
    remaining = (lifetime - spec.get_age(response)) * 1000
    return int(max(0, min(ttl_ms, remaining)))


def _items(headers: Any) -> list[tuple[str, str]]:
    return [(name, value) for name in headers for value in headers.get_list(name) or []]


def _joined(headers: list[tuple[str, str]], name: str) -> str:
    return ", ".join(v for n, v in headers if n.lower() == name)


def refuses_stored(request_headers: Headers) -> bool:
    """Whether a request's own ``Cache-Control`` refuses a stored answer (``no-cache``,
    ``no-store``, ``max-age=0``): it may join a flight in progress, never take a stored one."""
    directives = _joined(list(request_headers), "cache-control").lower().replace(" ", "")
    return any(d in directives.split(",") for d in ("no-cache", "no-store", "max-age=0"))


def allowed(
    share: Any, request_headers: Headers, *, credential_headers: Collection[str], secret: str | None
) -> bool:
    """Whether a caller that sent ``request_headers`` may take an answer stored with
    ``share`` (``Sharing.record()``): a bound answer only with the same non-empty
    credentials, a varying one only with the same values of the headers it varies on."""
    if share is None:
        return True
    if not isinstance(share, dict):
        return False  # malformed: not provably this caller's
    request_headers = list(request_headers)
    if share.get("bound"):
        mine = codec.credential_digest(request_headers, credential_headers, secret)
        if not mine or mine != share.get("cred"):
            return False
    vary = share.get("vary") or []
    if not isinstance(vary, list) or not all(isinstance(v, str) for v in vary):
        return False
    if not vary:
        return True
    if "*" in vary:
        return False
    return bool(codec.vary_digest(request_headers, vary, secret) == share.get("vd"))
