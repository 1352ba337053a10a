"""Prometheus metrics (the ``metrics`` extra: ``prometheus-client``).

Stem's code reports to :data:`recorder`, a :class:`Recorder` whose methods do nothing
until :func:`enable` (``stem worker start --metrics-port``, ``stem beat --metrics-port``,
or a producer calling ``stem.metrics.serve(port, app=app)``) swaps in a
:class:`PrometheusRecorder`; so metrics cost one no-op call per event when off.

Counters are incremented in the worker process, where outcomes are settled: tasks
run by the process pool's children are counted by the worker that owns them, and
the children report nothing. The names and their Dart Stem equivalents are in
docs/observability.md.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.ports import QueueStats

__all__ = ["PrometheusRecorder", "Recorder", "disable", "enable", "recorder", "serve"]

#: Seconds between two samples of the served queues' depth (broker.stats per queue).
QUEUE_SAMPLE_INTERVAL = 5.0


class Recorder:
    """What Stem reports; every method does nothing (metrics off)."""

    enabled = False

    def task_started(self, task: str, queue: str) -> None: ...
    def task_succeeded(self, task: str, queue: str, seconds: float) -> None: ...
    def task_retried(self, task: str, queue: str, seconds: float) -> None: ...
    def task_failed(self, task: str, queue: str, seconds: float | None) -> None: ...
    def task_rejected(self, task: str, queue: str) -> None: ...
    def task_expired(self, task: str, queue: str) -> None: ...
    def task_revoked(self, task: str, queue: str) -> None: ...
    def task_rate_limited(self, task: str, queue: str) -> None: ...
    def leases_renewed(self, n: int) -> None: ...
    def worker_started(self, worker: Any) -> None: ...
    def worker_stopped(self, worker: Any) -> None: ...
    def queue_sampled(self, stats: QueueStats) -> None: ...
    def schedule_due(self, n: int) -> None: ...
    def schedule_dispatched(self, drift_seconds: float) -> None: ...
    def schedule_failed(self) -> None: ...
    def track_app(self, app: Stem) -> None: ...


#: Where Stem reports; a no-op :class:`Recorder` until :func:`enable`.
recorder: Recorder = Recorder()
_lock = threading.Lock()


class PrometheusRecorder(Recorder):
    """Counters, a histogram and gauges in ``registry`` (a fresh ``CollectorRegistry``
    when None)."""

    enabled = True
    #: The port :func:`serve` listens on (None when not serving).
    port: int | None = None

    def __init__(self, registry: Any = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:
            raise ImportError("Stem's metrics need prometheus-client: pip install "
                              "'stem-tasks[metrics]'") from None
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        labels = ("task", "queue")

        def counter(name: str, doc: str, names: Sequence[str] = labels) -> Any:
            return Counter(name, doc, names, registry=r)

        self._started = counter("stem_tasks_started", "Tasks whose handler started.")
        self._succeeded = counter("stem_tasks_succeeded", "Tasks that succeeded.")
        self._failed = counter("stem_tasks_failed", "Tasks that failed for good.")
        self._retried = counter("stem_tasks_retried", "Attempts that will be retried.")
        self._revoked = counter("stem_tasks_revoked", "Tasks revoked before or while running.")
        self._rejected = counter("stem_tasks_rejected",
                                 "Deliveries dead-lettered without running (unknown task, "
                                 "bad arguments or signature, undecodable).")
        self._expired = counter("stem_tasks_expired", "Tasks dropped past their expiry.")
        self._rate_limited = counter("stem_tasks_rate_limited",
                                     "Starts deferred by a rate limit.")
        self._duration = Histogram(
            "stem_task_duration_seconds", "Seconds handlers ran.", labels, registry=r,
            buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self._renewed = Counter("stem_lease_renewed", "Leases renewed by workers.",
                                registry=r)
        self._due = Counter("stem_scheduler_due_entries", "Schedule entries found due.",
                            registry=r)
        self._dispatched = Counter("stem_scheduler_dispatch_success",
                                   "Schedule entries dispatched.", registry=r)
        self._dispatch_failed = Counter("stem_scheduler_dispatch_failed",
                                        "Schedule entries that could not be dispatched.",
                                        registry=r)
        self._drift = Histogram(
            "stem_scheduler_drift_seconds", "How late entries were dispatched.", registry=r,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self._workers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._apps: weakref.WeakSet[Stem] = weakref.WeakSet()
        self._queues: dict[str, QueueStats] = {}
        self._servers: list[Any] = []
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any, Any]] = {}
        r.register(_Collector(self))

    def _of(self, task: str, queue: str) -> tuple[Any, Any, Any, Any, Any]:
        """The labelled children of one task and queue (``labels()`` costs a lock and
        checks per call; a dict lookup is what every task pays instead)."""
        key = (task, queue)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._started.labels(task, queue), self._succeeded.labels(task, queue),
                self._retried.labels(task, queue), self._failed.labels(task, queue),
                self._duration.labels(task, queue))
        return children

    def task_started(self, task: str, queue: str) -> None:
        self._of(task, queue)[0].inc()

    def task_succeeded(self, task: str, queue: str, seconds: float) -> None:
        c = self._of(task, queue)
        c[1].inc()
        c[4].observe(seconds)

    def task_retried(self, task: str, queue: str, seconds: float) -> None:
        c = self._of(task, queue)
        c[2].inc()
        c[4].observe(seconds)

    def task_failed(self, task: str, queue: str, seconds: float | None) -> None:
        c = self._of(task, queue)
        c[3].inc()
        if seconds is not None:
            c[4].observe(seconds)

    def task_rejected(self, task: str, queue: str) -> None:
        self._rejected.labels(task, queue).inc()

    def task_expired(self, task: str, queue: str) -> None:
        self._expired.labels(task, queue).inc()

    def task_revoked(self, task: str, queue: str) -> None:
        self._revoked.labels(task, queue).inc()

    def task_rate_limited(self, task: str, queue: str) -> None:
        self._rate_limited.labels(task, queue).inc()

    def leases_renewed(self, n: int) -> None:
        self._renewed.inc(n)

    def worker_started(self, worker: Any) -> None:
        self._workers.add(worker)
        self.track_app(worker.app)

    def worker_stopped(self, worker: Any) -> None:
        self._workers.discard(worker)

    def queue_sampled(self, stats: QueueStats) -> None:
        self._queues[stats.queue] = stats

    def schedule_due(self, n: int) -> None:
        self._due.inc(n)

    def schedule_dispatched(self, drift_seconds: float) -> None:
        self._dispatched.inc()
        self._drift.observe(max(0.0, drift_seconds))

    def schedule_failed(self) -> None:
        self._dispatch_failed.inc()

    def track_app(self, app: Stem) -> None:
        """Export ``app.stats`` (deduplicated unique calls) too."""
        self._apps.add(app)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (what the endpoint serves)."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class _Collector:
    """The values read at scrape time: gauges and ``app.stats``."""

    def __init__(self, owner: PrometheusRecorder) -> None:
        self._owner = owner

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        o = self._owner
        workers = list(o._workers)
        yield GaugeMetricFamily("stem_worker_inflight", "Tasks running now.",
                                value=sum(w.in_flight for w in workers))
        yield GaugeMetricFamily("stem_worker_prefetched",
                                "Tasks leased and waiting for a free slot.",
                                value=sum(w.prefetched for w in workers))
        yield GaugeMetricFamily("stem_worker_concurrency", "Tasks a worker runs at once.",
                                value=sum(w.concurrency for w in workers))
        families = (
            ("stem_queue_depth", "Ready tasks in a served queue (sampled).", "pending"),
            ("stem_queue_delayed", "Tasks of a served queue due later (sampled).", "delayed"),
            ("stem_queue_in_flight", "Leased tasks of a served queue (sampled).", "in_flight"),
            ("stem_queue_dead_letters", "Dead letters of a served queue (sampled).", "dead"),
        )
        for name, doc, field in families:
            g = GaugeMetricFamily(name, doc, labels=["queue"])
            for queue, stats in sorted(o._queues.items()):
                g.add_metric([queue], getattr(stats, field))
            yield g
        dedup = CounterMetricFamily(
            "stem_tasks_deduplicated",
            "Unique calls that got a pending task's id instead of publishing.",
            labels=["task"])
        totals: dict[str, int] = {}
        for app in list(o._apps):
            for task, n in list(app.stats.deduplicated.items()):
                totals[task] = totals.get(task, 0) + n
        for task, n in sorted(totals.items()):
            dedup.add_metric([task], n)
        yield dedup


def enable(registry: Any = None) -> PrometheusRecorder:
    """Report to Prometheus from now on (the process-wide :data:`recorder`); returns it.

    Idempotent: a second call returns the recorder already installed.
    """
    global recorder
    with _lock:
        if isinstance(recorder, PrometheusRecorder):
            return recorder
        recorder = PrometheusRecorder(registry)
        return recorder


def serve(port: int, *, addr: str = "0.0.0.0", app: Stem | None = None) -> PrometheusRecorder:
    """:func:`enable`, then serve ``/metrics`` on ``addr:port`` from a daemon thread.

    ``app`` adds that app's producer counters (``app.stats``): call it in a web process
    that enqueues. Port 0 picks a free port (``recorder.port`` says which).
    """
    from prometheus_client import start_http_server

    rec = enable()
    if app is not None:
        rec.track_app(app)
    server, _thread = start_http_server(port, addr=addr, registry=rec.registry)
    rec.port = server.server_port
    rec._servers.append(server)
    return rec


def disable() -> None:
    """Back to the no-op recorder; stop the endpoints :func:`serve` started."""
    global recorder
    with _lock:
        if isinstance(recorder, PrometheusRecorder):
            for server in recorder._servers:
                server.shutdown()
                server.server_close()
        recorder = Recorder()
