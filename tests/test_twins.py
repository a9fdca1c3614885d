"""Sync and async twins expose the same options, and __all__ is honest."""

from __future__ import annotations

import inspect

import dedupcall
from dedupcall import AsyncDedupTransport, DedupTransport


def _params(fn: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


def test_transport_twins_take_the_same_options() -> None:
    assert _params(DedupTransport.__init__) == _params(AsyncDedupTransport.__init__)
    assert _params(DedupTransport.handle_request) == _params(
        AsyncDedupTransport.handle_async_request
    )
    assert _params(DedupTransport.close) == _params(AsyncDedupTransport.aclose)


def test_dedup_close_twins() -> None:
    assert _params(dedupcall.Dedup.close) == _params(dedupcall.Dedup.aclose)


def test_all_is_sorted_and_complete() -> None:
    assert dedupcall.__all__ == sorted(dedupcall.__all__)
    public = {
        name
        for name, value in vars(dedupcall).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(dedupcall.__all__)
    for name in dedupcall.__all__:
        assert getattr(dedupcall, name).__doc__, f"{name} has no docstring"
