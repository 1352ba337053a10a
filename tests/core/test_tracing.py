"""OpenTelemetry: a trace started by the producer continues into the task's spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import stem
from stem import tracing
from tests.helpers import running_worker

_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # once per process: the API allows one
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


async def test_producer_trace_id_appears_on_the_execute_span(
        namespace: str, spans: InMemorySpanExporter) -> None:
    assert tracing.ENABLED
    app = stem.Stem("tr", broker=f"memory://{namespace}", backend=f"memory://{namespace}")
    seen: dict[str, str] = {}

    @app.task(name="child")
    def child() -> int:  # a def handler: runs in a thread, the span still current
        seen["child"] = format(trace.get_current_span().get_span_context().trace_id, "032x")
        return 2

    @app.task(name="parent")
    async def parent() -> str:
        seen["parent"] = format(trace.get_current_span().get_span_context().trace_id, "032x")
        return await child.enqueue()

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("POST /orders") as request:
        trace_id = format(request.get_span_context().trace_id, "032x")
        task_id = await parent.enqueue()
    async with running_worker(app):
        child_id = (await app.wait(task_id, timeout=5)).value
        await app.wait(child_id, timeout=5)
    assert seen == {"parent": trace_id, "child": trace_id}
    stored = await app.backend.get(task_id)
    assert stored is not None
    finished = {s.name: s for s in spans.get_finished_spans()}
    execute = finished["stem.execute.parent"]
    assert format(execute.context.trace_id, "032x") == trace_id
    assert execute.attributes is not None
    assert execute.attributes["stem.task"] == "parent"
    assert execute.attributes["stem.task.id"] == task_id
    assert execute.attributes["stem.span.phase"] == "execute"
    consume = finished["stem.consume"]
    assert consume.kind == trace.SpanKind.CONSUMER
    assert format(consume.context.trace_id, "032x") == trace_id
    assert execute.parent is not None and consume.context is not None
    enqueue = [s for s in spans.get_finished_spans() if s.name == "stem.enqueue"]
    assert enqueue[0].kind == trace.SpanKind.PRODUCER
    assert enqueue[0].parent is not None
    assert enqueue[0].parent.span_id == request.get_span_context().span_id
    assert format(finished["stem.execute.child"].context.trace_id, "032x") == trace_id


async def test_a_failing_task_records_the_error(namespace: str,
                                                spans: InMemorySpanExporter) -> None:
    app = stem.Stem("tr", broker=f"memory://{namespace}", backend=f"memory://{namespace}")

    @app.task(name="bad")
    async def bad() -> None:
        raise ValueError("nope")

    async with running_worker(app):
        await app.wait(await bad.enqueue(), timeout=5)
    (execute,) = [s for s in spans.get_finished_spans() if s.name == "stem.execute.bad"]
    assert execute.status.status_code == trace.StatusCode.ERROR
    assert [e.name for e in execute.events] == ["exception"]
