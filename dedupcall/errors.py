"""Every exception dedupcall raises.

Hierarchy::

    DedupError                      base of everything raised here
    ├── ConfigError(ValueError)     invalid configuration or argument values
    ├── PathTemplateError(TypeError) a path template that does not fit the function
    ├── SerializationError(TypeError) a value that cannot be encoded for Redis
    ├── RedisUnavailable            Redis unreachable, timing out or refusing commands
    ├── WaitTimeout(TimeoutError)   a wait ended before the flight did
    ├── UnknownRequest(KeyError)    no flight and no result for a request id
    ├── ConflictError               same api_path, different request, no on_conflict="join"
    ├── LeaseLost                   an executor's lease was taken over (fencing)
    ├── EngineNotFound              no local server engine to start (embedded.py)
    └── CallFailed                  the flight ended without success; carries the error
        ├── QueueCleared            the flight was removed by clear_queue
        ├── FlightDropped           every waiter left before the flight started
        └── TransportCallFailed(httpx.TransportError)   a transport flight ended without
            │                       any response, so ``except httpx.TransportError`` works
            └── ResponseTooLarge    a response exceeded the transport's max_body_bytes

This module imports nothing of ours, so every layer may import it.
"""

from __future__ import annotations

import httpx


class DedupError(Exception):
    """Base class of every exception raised by dedupcall."""


class ConfigError(DedupError, ValueError):
    """A configuration value or argument is invalid; nothing was changed."""


class PathTemplateError(DedupError, TypeError):
    """A ``path=`` template names arguments the decorated function does not have."""


class SerializationError(DedupError, TypeError):
    """A value (argument, result, payload) cannot be encoded as JSON for Redis."""


class RedisUnavailable(DedupError):
    """Redis could not be reached, timed out, or refused a command (OOM, NOPERM, READONLY)."""


class WaitTimeout(DedupError, TimeoutError):
    """A caller's wait ended before its flight produced a result."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class UnknownRequest(DedupError, KeyError):
    """No flight and no stored result exist for this request id."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id)
        self.request_id = request_id

    def __str__(self) -> str:
        return f"unknown request id {self.request_id!r} (never queued, or its result expired)"


class ConflictError(DedupError):
    """A different request is already in flight for the same ``api_path``.

    Joining it would hand this caller another request's answer; pass
    ``on_conflict="join"`` to join anyway.
    """

    def __init__(self, message: str, *, request_id: str, api_path: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.api_path = api_path


class LeaseLost(DedupError):
    """An executor's lease expired and the flight moved on; its completion was refused."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class EngineNotFound(DedupError):
    """No local Redis-compatible server binary could be found to start."""


class CallFailed(DedupError):
    """The flight ended without success. Every caller of the flight receives the same one.

    ``error_type`` and ``message`` describe the last error; ``attempts`` counts runs.
    In the process that executed the call, ``__cause__`` is the original exception.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str = "Error",
        attempts: int = 0,
        request_id: str | None = None,
        key: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.attempts = attempts
        self.request_id = request_id
        self.key = key
        self.status_code = status_code

    def __str__(self) -> str:
        where = f" for {self.key!r}" if self.key is not None else ""
        return f"{self.error_type}{where} after {self.attempts} attempt(s): {self.message}"


class QueueCleared(CallFailed):
    """The flight was removed from the queue by ``clear_queue`` before it ran."""


class FlightDropped(CallFailed):
    """Every waiter left the flight before it started, so it was dropped."""


class TransportCallFailed(CallFailed, httpx.TransportError):
    """A flight of ``DedupTransport``/``AsyncDedupTransport`` failed without any response
    (transport errors after every retry, a dropped or cleared flight). Also an
    ``httpx.TransportError``, whose ``request`` it carries."""


class ResponseTooLarge(TransportCallFailed):
    """A response exceeded the transport's ``max_body_bytes``, so it was not shared: the
    caller that sent the request got it; the others should retry without dedup."""
