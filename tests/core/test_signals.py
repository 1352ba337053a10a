"""Signals on an in-process worker: order, payloads, app scoping, sender filters, disabling."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

import stem
from stem import signals
from stem.worker import Worker
from tests.helpers import eventually, running_worker


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


@pytest.fixture
def signal_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    yield monkeypatch
    monkeypatch.undo()
    signals.configure()  # back to what the environment says


def _record(events: list[tuple[str, Any, dict[str, Any]]], names: list[str],
            scope: Any) -> None:
    for name in names:
        def receiver(sender: Any, _name: str = name, **kw: Any) -> None:
            events.append((_name, sender, kw))
        getattr(scope, name).connect(receiver)


TASK_SIGNALS = ["before_task_publish", "after_task_publish", "task_received", "task_prerun",
                "task_postrun", "task_succeeded", "task_retry", "task_failed"]
WORKER_SIGNALS = ["worker_init", "worker_ready", "worker_stopping", "worker_heartbeat",
                  "worker_shutdown"]


async def test_order_and_payloads_of_a_success_a_retry_and_a_failure(app: stem.Stem) -> None:
    events: list[tuple[str, Any, dict[str, Any]]] = []
    _record(events, TASK_SIGNALS + WORKER_SIGNALS, app.signals)

    @app.task(name="ok")
    async def ok(x: int) -> int:
        return x * 2

    @app.task(name="flaky", max_retries=1)
    async def flaky(ctx: stem.TaskContext) -> str:
        if ctx.attempt == 0:
            raise stem.Retry(countdown=0.01)
        raise ValueError("no")

    async with running_worker(app, heartbeat_interval=0.05) as worker:
        ok_id = await ok.enqueue(21)
        assert (await app.wait(ok_id, timeout=5)).value == 42
        flaky_id = await flaky.enqueue()
        await app.wait(flaky_id, timeout=5)
        async def heartbeat_seen() -> bool:
            return any(e[0] == "worker_heartbeat" for e in events)

        await eventually(heartbeat_seen)
    names = [e[0] for e in events if e[0].startswith("worker_") and e[0] != "worker_heartbeat"]
    assert names == ["worker_init", "worker_ready", "worker_stopping", "worker_shutdown"]
    ok_events = [(n, kw) for n, _, kw in events
                 if kw.get("envelope") is not None and kw["envelope"].id == ok_id]
    assert [n for n, _ in ok_events] == [
        "before_task_publish", "after_task_publish", "task_received", "task_prerun",
        "task_succeeded", "task_postrun"]
    by_name = dict(ok_events)
    assert by_name["after_task_publish"]["task_id"] == ok_id
    assert by_name["task_succeeded"]["result"] == 42
    assert by_name["task_postrun"]["state"] == stem.TaskState.SUCCEEDED
    assert isinstance(by_name["task_prerun"]["context"], stem.TaskContext)
    flaky_names = [n for n, _, kw in events
                   if kw.get("envelope") is not None and kw["envelope"].id == flaky_id
                   and n.startswith("task_")]
    assert flaky_names == ["task_received", "task_prerun", "task_retry", "task_postrun",
                           "task_received", "task_prerun", "task_failed", "task_postrun"]
    retry = next(kw for n, _, kw in events if n == "task_retry")
    assert retry["delay"] == pytest.approx(0.01) and retry["envelope"].attempt == 0
    failed = next(kw for n, _, kw in events if n == "task_failed")
    assert failed["error"].type == "ValueError" and failed["envelope"].attempt == 1
    senders = {n: s for n, s, _ in events}
    assert senders["before_task_publish"] is app and senders["task_prerun"] is worker
    heartbeat = next(kw for n, _, kw in events if n == "worker_heartbeat")
    assert set(heartbeat) == {"in_flight", "prefetched", "processed", "queues"}


async def test_two_apps_in_one_process_do_not_hear_each_other(namespace: str) -> None:
    a = stem.Stem("a", broker=f"memory://{namespace}-a", backend=f"memory://{namespace}-a")
    b = stem.Stem("b", broker=f"memory://{namespace}-b", backend=f"memory://{namespace}-b")
    listeners = signals.task_success._count
    heard: dict[str, list[str]] = {"a": [], "b": [], "all": []}
    a.signals.task_succeeded.connect(lambda s, envelope, **_: heard["a"].append(envelope.id))
    b.signals.task_succeeded.connect(lambda s, envelope, **_: heard["b"].append(envelope.id))

    def everyone(sender: Any, envelope: Any, **_: Any) -> None:
        heard["all"].append(envelope.id)

    signals.task_success.connect(everyone)  # the module-level API hears every app
    try:
        for app in (a, b):
            @app.task(name="noop")
            async def noop() -> None:
                return None
        async with running_worker(a), running_worker(b):
            ida = await a.enqueue("noop")
            idb = await b.enqueue("noop")
            await a.wait(ida, timeout=5)
            await b.wait(idb, timeout=5)
    finally:
        signals.task_success.disconnect(everyone)
    assert heard["a"] == [ida] and heard["b"] == [idb]
    assert sorted(heard["all"]) == sorted([ida, idb])
    del a, b, app, noop
    gc.collect()  # a dead app's receivers no longer count as listeners
    assert signals.task_success._count == listeners


async def test_sender_filter_by_task_and_async_receivers(app: stem.Stem) -> None:
    seen: list[str] = []
    done = asyncio.Event()

    @app.task(name="one")
    async def one() -> int:
        return 1

    @app.task(name="two")
    async def two() -> int:
        return 2

    @app.signals.task_succeeded.connect(sender="one")
    async def on_one(sender: Any, *, envelope: Any, **_: Any) -> None:
        seen.append(envelope.name)
        done.set()

    app.signals.task_succeeded.connect(lambda s, envelope, **_: seen.append("def:" + envelope.name),
                                       sender=two)
    async with running_worker(app):
        await app.wait(await two.enqueue(), timeout=5)
        await app.wait(await one.enqueue(), timeout=5)
        await asyncio.wait_for(done.wait(), 5)
    assert seen == ["def:two", "one"]


async def test_disabled_by_dart_kebab_names(app: stem.Stem,
                                            signal_env: pytest.MonkeyPatch) -> None:
    monkeypatch = signal_env
    monkeypatch.setenv("STEM_SIGNALS_DISABLED", "task-prerun, task-succeeded")
    signals.configure()
    assert not signals.task_prerun.enabled and not signals.task_success.enabled
    assert signals.task_postrun.enabled
    heard: list[str] = []
    for name in ("task_prerun", "task_succeeded", "task_postrun"):
        getattr(app.signals, name).connect(lambda s, _n=name, **kw: heard.append(_n))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with running_worker(app):
        await app.wait(await noop.enqueue(), timeout=5)
    assert heard == ["task_postrun"]
    monkeypatch.setenv("STEM_SIGNALS_ENABLED", "false")
    monkeypatch.delenv("STEM_SIGNALS_DISABLED")
    signals.configure()
    assert not any(s.enabled for s in signals.all_signals())


def test_every_dart_signal_name_exists() -> None:
    dart = ("before-task-publish after-task-publish task-received task-prerun task-postrun "
            "task-retry task-succeeded task-failed task-revoked worker-init worker-ready "
            "worker-stopping worker-shutdown worker-heartbeat schedule-entry-due "
            "schedule-entry-dispatched schedule-entry-failed control-command-received "
            "control-command-completed").split()
    events = {s.event for s in signals.all_signals()}
    assert set(dart) <= events
    for name in dart:
        assert getattr(signals, name.replace("-", "_")).event == name
    app = stem.Stem("x", broker="memory://sig-names", backend="memory://sig-names")
    assert app.signals.task_failed.event == "task-failed"


def test_worker_init_is_heard_by_its_app_only(app: stem.Stem) -> None:
    other = stem.Stem("o", broker="memory://sig-other", backend="memory://sig-other")
    heard: list[Any] = []
    app.signals.worker_init.connect(heard.append)
    Worker(other)
    w = Worker(app)
    assert heard == [w]
