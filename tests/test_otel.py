"""OpenTelemetry spans, with the SDK's in-memory exporter: opt-in, one span per call,
one per attempt, the attempt a child of the call that opened the flight."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from dedupcall import CallFailed, Dedup
from dedupcall.otel import instrument, uninstrument


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_calls_and_attempts_become_spans(
    dedup: Dedup, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    await dedup.call("/untraced", lambda: asyncio.sleep(0, result=0))
    instrument(dedup, provider)
    await asyncio.gather(
        *(dedup.call("/k", lambda: asyncio.sleep(0.02, result=1)) for _ in range(3))
    )
    await dedup.call("/k", lambda: asyncio.sleep(0, result=1))  # cached
    finished = exporter.get_finished_spans()
    calls = [s for s in finished if s.name == "dedupcall.call"]
    [execute] = [s for s in finished if s.name == "dedupcall.execute"]
    assert sorted(s.attributes["dedupcall.outcome"] for s in calls) == [  # type: ignore[index]
        "cached",
        "executed",
        "joined",
        "joined",
    ]
    assert all(s.attributes["dedupcall.key"] == "/k" for s in calls)  # type: ignore[index]
    [opener] = [s for s in calls if s.attributes["dedupcall.outcome"] == "executed"]  # type: ignore[index]
    assert execute.parent is not None and execute.parent.span_id == opener.context.span_id
    assert execute.attributes["dedupcall.attempt"] == 1  # type: ignore[index]
    assert execute.attributes["dedupcall.ended"] == "succeeded"  # type: ignore[index]
    assert execute.attributes["dedupcall.instance_id"] == dedup.instance_id  # type: ignore[index]
    assert execute.attributes["dedupcall.key"] == "/k"  # type: ignore[index]

    exporter.clear()
    uninstrument(dedup)
    await dedup.call("/again", lambda: asyncio.sleep(0, result=0))
    assert exporter.get_finished_spans() == ()


async def test_a_failed_flight_marks_its_spans_as_errors(
    dedup: Dedup, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    instrument(dedup, provider)

    async def boom() -> None:
        raise ValueError("no")

    with pytest.raises(CallFailed):
        await dedup.call("/boom", boom)
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert by_name["dedupcall.call"].status.status_code is StatusCode.ERROR
    assert "ValueError: no" in (by_name["dedupcall.call"].status.description or "")
    assert by_name["dedupcall.execute"].attributes["dedupcall.ended"] == "failed"  # type: ignore[index]
