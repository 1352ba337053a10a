"""Prometheus metrics: the endpoint scraped after a run shows the counts per task and queue."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import stem
from stem import metrics
from tests.helpers import running_worker


@pytest.fixture
def served() -> Iterator[metrics.PrometheusRecorder]:
    rec = metrics.serve(0, addr="127.0.0.1")
    try:
        yield rec
    finally:
        metrics.disable()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_scraped_counts_per_task_and_queue(namespace: str,
                                                 served: metrics.PrometheusRecorder) -> None:
    app = stem.Stem("m", broker=f"memory://{namespace}", backend=f"memory://{namespace}")

    @app.task(name="ok", queue="fast")
    async def ok() -> int:
        return 1

    @app.task(name="boom", max_retries=1)
    async def boom(ctx: stem.TaskContext) -> None:
        if ctx.attempt == 0:
            raise stem.Retry(countdown=0.01)
        raise ValueError("no")

    @app.task(name="once", unique=True, unique_for=60)
    async def once() -> None:
        await asyncio.sleep(0)

    ids = [await ok.enqueue() for _ in range(3)]
    first = await once.enqueue()
    assert await once.enqueue() == first  # deduplicated
    async with running_worker(app, concurrency=4) as worker:
        ids.append(await boom.enqueue())
        for i in [*ids, first]:
            await app.wait(i, timeout=5, raise_on_failure=False)
        m = await asyncio.to_thread(_scrape, served.port)
        assert m[("stem_worker_concurrency", ())] == 4 == worker.concurrency
    assert m[("stem_tasks_started_total", (("queue", "fast"), ("task", "ok")))] == 3
    assert m[("stem_tasks_succeeded_total", (("queue", "fast"), ("task", "ok")))] == 3
    boom_labels = (("queue", "default"), ("task", "boom"))
    assert m[("stem_tasks_started_total", boom_labels)] == 2
    assert m[("stem_tasks_retried_total", boom_labels)] == 1
    assert m[("stem_tasks_failed_total", boom_labels)] == 1
    assert m.get(("stem_tasks_failed_total", (("queue", "fast"), ("task", "ok"))), 0) == 0
    assert m[("stem_task_duration_seconds_count", (("queue", "fast"), ("task", "ok")))] == 3
    assert m[("stem_tasks_deduplicated_total", (("task", "once"),))] == 1
    assert m[("stem_worker_inflight", ())] == 0


async def test_queue_depth_is_sampled(namespace: str, served: metrics.PrometheusRecorder,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "QUEUE_SAMPLE_INTERVAL", 0.05)
    app = stem.Stem("m", broker=f"memory://{namespace}", backend=f"memory://{namespace}")

    @app.task(name="later")
    async def later() -> None:
        return None

    for _ in range(2):
        await app.enqueue(later, countdown=3600)  # waits as delayed, never runs
    async with running_worker(app):
        for _ in range(200):
            m = await asyncio.to_thread(_scrape, served.port)
            if m.get(("stem_queue_delayed", (("queue", "default"),))) == 2:
                break
            await asyncio.sleep(0.02)
    assert m[("stem_queue_delayed", (("queue", "default"),))] == 2
    assert m[("stem_queue_depth", (("queue", "default"),))] == 0


def test_off_by_default_costs_a_no_op() -> None:
    assert type(metrics.recorder) is metrics.Recorder and not metrics.recorder.enabled
