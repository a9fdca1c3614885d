"""OpenTelemetry spans (``pip install "dedupcall[otel]"``), opt-in per ``Dedup``.

``dedupcall.otel.instrument(dedup)`` makes every call a ``dedupcall.call`` span
(attributes: key, kind, outcome, request id; an error status when the flight failed) and
every attempt this instance runs a ``dedupcall.execute`` span (key, request id, attempt,
instance id, how it ended). The attempt of a flight opened here is a child of the span of
the call that opened it. Without ``instrument`` nothing is traced and nothing is paid.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dedupcall.errors import ConfigError

try:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode, Tracer, TracerProvider
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from dedupcall.core import Dedup
    from dedupcall.models import Grant, Result
    from dedupcall.worker import Finished

T = TypeVar("T")


class Tracing:
    """The spans of one ``Dedup`` (see the module docstring)."""

    def __init__(self, tracer: Tracer, instance_id: Callable[[], str]) -> None:
        self.tracer = tracer
        self.instance_id = instance_id

    async def call(
        self,
        run: Callable[[], Awaitable[tuple[Result, BaseException | None]]],
        kind: str,
        key: str,
    ) -> tuple[Result, BaseException | None]:
        attributes = {"dedupcall.key": key, "dedupcall.kind": kind}
        with self.tracer.start_as_current_span("dedupcall.call", attributes=attributes) as span:
            result, error = await run()
            span.set_attribute("dedupcall.outcome", result.outcome or "")
            span.set_attribute("dedupcall.request_id", result.request_id)
            if not result.success:
                span.set_status(Status(StatusCode.ERROR, f"{result.error_type}: {result.error}"))
            return result, error

    async def execute(
        self, run: Callable[[], Awaitable[Finished]], grant: Grant, key: str | None
    ) -> Finished:
        attributes: dict[str, Any] = {
            "dedupcall.request_id": grant.request_id,
            "dedupcall.kind": grant.kind,
            "dedupcall.attempt": grant.attempts,
            "dedupcall.instance_id": self.instance_id(),
        }
        if key is not None:
            attributes["dedupcall.key"] = key
        with self.tracer.start_as_current_span("dedupcall.execute", attributes=attributes) as span:
            finished = await run()
            span.set_attribute("dedupcall.ended", _ended(finished))
            if finished.result is not None and not finished.result.success:
                result = finished.result
                span.set_status(Status(StatusCode.ERROR, f"{result.error_type}: {result.error}"))
            return finished


def _ended(finished: Finished) -> str:
    if finished.lost:
        return "lease lost"
    if finished.result is not None:
        return "succeeded" if finished.result.success else "failed"
    return "retry scheduled" if finished.error is None else "not stored"


def instrument(dedup: Dedup, tracer_provider: TracerProvider | None = None) -> None:
    """Trace ``dedup``'s calls and attempts with ``tracer_provider`` (default: the global
    one). ``ConfigError`` when ``opentelemetry-api`` is not installed."""
    if not AVAILABLE:
        raise ConfigError('OpenTelemetry spans need: pip install "dedupcall[otel]"')
    tracer = trace.get_tracer("dedupcall", tracer_provider=tracer_provider)
    dedup.tracing = Tracing(tracer, lambda: dedup.instance_id)


def uninstrument(dedup: Dedup) -> None:
    """Stop tracing ``dedup``."""
    dedup.tracing = None
