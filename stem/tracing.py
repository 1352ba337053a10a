"""OpenTelemetry spans for publish, consume and execute, with the Dart Stem's names.

Active when ``opentelemetry-api`` is importable (the ``otel`` extra),
``STEM_TRACING`` is not ``0/false/no/off`` and the application set a tracer provider
(:func:`active`); otherwise every call site skips this module with one boolean check
(and, with the package installed, one ``isinstance``).

- ``stem.enqueue`` (kind PRODUCER) around ``enqueue`` / ``enqueue_many``; the producer
  writes the W3C ``traceparent`` (and ``tracestate``) of the current span into the
  envelope's headers before it is signed;
- ``stem.consume`` (kind CONSUMER) from a delivery's start to its outcome, a child of
  the producer's context read back from those headers;
- ``stem.execute.<task>`` around the handler, current while it runs, so its own spans
  and the tasks it enqueues continue the trace.

Attributes: ``stem.task``, ``stem.task.id``, ``stem.task.attempt``,
``stem.task.max_retries``, ``stem.task.priority``, ``stem.queue``, ``stem.namespace``,
``stem.span.phase`` (``consume`` / ``execute``), ``host.name``, ``stem.parent_task_id`` /
``stem.root_task_id`` when the envelope has them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator, MutableMapping
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from stem.task import META_PARENT_TASK_ID, META_ROOT_TASK_ID

if TYPE_CHECKING:
    from stem.envelope import Envelope


def _importable(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


#: True when spans are made (opentelemetry-api importable and STEM_TRACING not off).
ENABLED: bool = _importable("opentelemetry.trace") and os.environ.get(
    "STEM_TRACING", "1").strip().lower() not in {"0", "false", "no", "off"}

_HOST = socket.gethostname()
# The API is imported by the first active() that finds it imported by someone else: a
# tracer provider is set through it, so a process that never imported it has none, and
# does not pay for importing it (see _load).
_otel_trace: Any = None
_otel_context: Any = None
_propagator: Any = None


def _load() -> bool:
    """Bind the API's modules once the application imported them (True when it did)."""
    global _otel_trace, _otel_context, _propagator
    if sys.modules.get("opentelemetry.trace") is None:
        return False
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _otel_context, _propagator = context, TraceContextTextMapPropagator()
    _otel_trace = trace
    return True


def active() -> bool:
    """True when spans would be recorded: :data:`ENABLED` and the application set a
    tracer provider (until then the API's proxy makes no-op spans, which still cost
    about 20 µs per task; so call sites skip them)."""
    if not ENABLED:
        return False
    if _otel_trace is None and not _load():  # nobody imported the API: no provider
        return False
    # The API's global, None until set_tracer_provider (get_tracer_provider() would look
    # at the environment on every call until then: 2 µs).
    provider = getattr(_otel_trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN:  # an API version without it
        provider = _otel_trace.get_tracer_provider()
    return provider is not None and not isinstance(
        provider, _otel_trace.ProxyTracerProvider | _otel_trace.NoOpTracerProvider)


_UNKNOWN = object()


def _tracer() -> Any:
    # Looked up on each span: a provider configured after import is still used.
    return _otel_trace.get_tracer("stem")


def _attributes(env: Envelope, namespace: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "stem.task": env.name, "stem.task.id": env.id, "stem.task.attempt": env.attempt,
        "stem.task.max_retries": env.max_retries, "stem.task.priority": env.priority,
        "stem.queue": env.queue, "host.name": _HOST,
    }
    if namespace:
        attrs["stem.namespace"] = namespace
    for key, attr in ((META_PARENT_TASK_ID, "stem.parent_task_id"),
                      (META_ROOT_TASK_ID, "stem.root_task_id")):
        value = env.meta.get(key)
        if isinstance(value, str):
            attrs[attr] = value
    return attrs


def inject(headers: MutableMapping[str, str]) -> None:
    """Write the current span's ``traceparent`` (W3C) into ``headers`` (nothing when no
    span is recording)."""
    _propagator.inject(headers)


@contextlib.contextmanager
def enqueue_span(task: str, queue: str | None, namespace: str, count: int = 1
                 ) -> Iterator[Any]:
    """``stem.enqueue`` around building and publishing ``count`` envelopes."""
    attrs: dict[str, Any] = {"stem.task": task, "stem.namespace": namespace,
                             "host.name": _HOST}
    if queue:
        attrs["stem.queue"] = queue
    if count != 1:
        attrs["stem.batch.size"] = count
    with _tracer().start_as_current_span(
            "stem.enqueue", kind=_otel_trace.SpanKind.PRODUCER, attributes=attrs) as span:
        yield span


def enqueued(span: Any, env: Envelope) -> None:
    """Add what is known once the envelope is built (its id, priority, attempt)."""
    if span.is_recording():
        span.set_attribute("stem.task.id", env.id)
        span.set_attribute("stem.task.priority", env.priority)
        span.set_attribute("stem.queue", env.queue)


class TaskSpans:
    """The consume span of one delivery and, inside it, the execute span."""

    __slots__ = ("_consume", "_env", "_namespace", "_token")

    def __init__(self, env: Envelope, namespace: str | None) -> None:
        self._env = env
        self._namespace = namespace
        parent = _propagator.extract(env.headers)
        attrs = _attributes(env, namespace)
        attrs["stem.span.phase"] = "consume"
        self._consume = _tracer().start_span(
            "stem.consume", context=parent, kind=_otel_trace.SpanKind.CONSUMER,
            attributes=attrs)
        self._token: Any = None

    @contextlib.contextmanager
    def execute(self) -> Iterator[Any]:
        """``stem.execute.<task>``, current while the handler runs; an exception it
        raises is recorded and re-raised."""
        attrs = _attributes(self._env, self._namespace)
        attrs["stem.span.phase"] = "execute"
        ctx = _otel_trace.set_span_in_context(self._consume)
        span = _tracer().start_span(f"stem.execute.{self._env.name}", context=ctx,
                                    attributes=attrs)
        token = _otel_context.attach(_otel_trace.set_span_in_context(span, ctx))
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(_otel_trace.Status(_otel_trace.StatusCode.ERROR, repr(exc)))
            raise
        finally:
            _otel_context.detach(token)
            span.end()

    def end(self, state: str | None = None) -> None:
        """End the consume span with the delivery's outcome (``succeeded``, ...)."""
        if state is not None and self._consume.is_recording():
            self._consume.set_attribute("stem.task.state", state)
        self._consume.end()


__all__ = ["ENABLED", "TaskSpans", "active", "enqueue_span", "enqueued", "inject"]
