"""Producers that do not import the handlers: routes, ``app.definition``, ``stem.enqueue``.

``Stem(routes={...})`` sends tasks that do not name their queue to the right one (exact
names first, then globs in order); ``app.definition(name, queue=..., params=[...])``
declares a task for a producer; the module-level ``stem.enqueue`` / ``stem.wait`` /
``stem.get_result`` use the default app (``set_default_app``, else the environment).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import stem
from stem.worker import Worker
from tests.conformance.conftest import ADAPTERS, adapter_url
from tests.core.test_sync_producer import worker_thread
from tests.helpers import running_worker

ROUTES = {"payments.*": "payments", "email.send": "mail", "email.*": "bulk",
          "payments.refund": "refunds"}


@pytest.fixture(autouse=True)
def no_default_app() -> Iterator[None]:
    """Each test starts and ends without a default app."""
    stem.set_default_app(None)
    yield
    stem.set_default_app(None)


def worker_app(url: str, namespace: str) -> stem.Stem:
    """The worker side: the handlers, on explicit queues."""
    app = stem.Stem("workers", broker=url, namespace=namespace)

    @app.task(name="payments.charge", queue="payments")
    async def charge(amount: int, to: str) -> str:
        return f"charged {amount} to {to}"

    @app.task(name="email.send")  # no queue: default
    async def send(to: str) -> str:
        return f"sent to {to}"

    return app


# -- the table --------------------------------------------------------------------------


def test_exact_names_win_then_the_first_matching_glob_then_the_default() -> None:
    app = stem.Stem("r", broker="memory://", routes=ROUTES)
    assert app.route("payments.refund") == "refunds"  # exact, though a glob comes first
    assert app.route("payments.charge") == "payments"
    assert app.route("email.send") == "mail"
    assert app.route("email.digest") == "bulk"
    assert app.route("reports.daily") == "default"
    assert app.route("Payments.charge") == "default"  # case-sensitive on every platform
    app2 = stem.Stem("r", broker="memory://", default_queue="misc",
                     routes={"a.?": "one", "a.[xy]*": "two", "a.*": "three"})
    assert [app2.route(n) for n in ("a.b", "a.xz", "a.zz", "b")] == \
        ["one", "two", "three", "misc"]
    assert app2.route("a.b") == "one"  # cached answers stay the same


@pytest.mark.parametrize("routes", [
    {"payments.*": 1}, {"payments.*": None}, {"payments.*": ""}, {"": "q"}, {1: "q"},
    ["payments.*"],
])
def test_routes_are_checked_when_the_app_is_built(routes: object) -> None:
    with pytest.raises(stem.ConfigurationError, match="routes"):
        stem.Stem("r", broker="memory://", routes=routes)  # type: ignore[arg-type]


def test_registered_tasks_without_a_queue_are_routed_explicit_queues_kept() -> None:
    app = stem.Stem("r", broker="memory://", routes=ROUTES)

    @app.task(name="payments.capture")
    async def capture() -> None: ...

    @app.task(name="payments.void", queue="manual")
    async def void() -> None: ...

    @app.task(name="other")
    async def other() -> None: ...

    assert capture.options.queue == "payments"
    assert void.options.queue == "manual"
    assert other.options.queue == "default"
    # A worker for this app listens on the routed queues too.
    assert Worker(app).queues == ["default", "payments", "manual"]


def test_definition_declares_a_task_for_a_producer_without_the_handler() -> None:
    app = stem.Stem("r", broker="memory://", routes=ROUTES)
    charge = app.definition("payments.charge", queue="billing", params=["amount", "to"])
    env = app.build_envelope(charge.call(5, to="a"))
    assert (env.name, env.queue, env.args) == ("payments.charge", "billing", {"amount": 5,
                                                                            "to": "a"})
    routed = app.definition("payments.charge", params=["amount", "to"])
    assert app.build_envelope(routed.call(5, "a")).queue == "payments"
    assert app.build_envelope(routed.call(5, "a").with_options(queue="x")).queue == "x"
    assert app.definition("payments.refund").options.queue == "refunds"
    assert app.definition("x", options=stem.TaskOptions(priority=3), queue="q").options \
        == stem.TaskOptions(priority=3, queue="q")
    with pytest.raises(stem.TaskArgumentError):
        routed.call(1, 2, 3)

    @app.task(name="local", queue="here")
    async def local() -> None: ...

    assert app.definition("local", queue="ignored") is local  # a registered task as it is


# -- on every adapter -------------------------------------------------------------------


@pytest.fixture(params=ADAPTERS)
def url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> str:
    return adapter_url(request.param, namespace, tmp_path, request)


async def test_stem_enqueue_by_name_is_routed_to_the_handlers_queue(
        url: str, namespace: str) -> None:
    producer = stem.Stem("producer", broker=url, namespace=namespace, routes=ROUTES)
    stem.set_default_app(producer)
    assert stem.default_app() is producer
    workers = worker_app(url, namespace)
    tid = await stem.enqueue("payments.charge", amount=5, to="a")
    declared = producer.definition("payments.charge", params=["amount", "to"])
    tid2 = await declared.enqueue(7, "b")
    stats = {q: (await producer.broker.stats(q)).pending for q in ("payments", "default")}
    assert stats == {"payments": 2, "default": 0}
    async with running_worker(workers, queues=["payments"]):
        done = await stem.wait(tid, timeout=10)
        assert (done.state, done.value) == (stem.TaskState.SUCCEEDED, "charged 5 to a")
        assert (await producer.wait(tid2, timeout=10)).value == "charged 7 to b"
    got = await stem.get_result(tid)
    assert got is not None and got.value == "charged 5 to a"
    await producer.close()
    await workers.close()


async def test_the_default_app_comes_from_the_environment(
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://{namespace}"
    monkeypatch.setenv("STEM_BROKER_URL", url)
    monkeypatch.setenv("STEM_NAMESPACE", namespace)
    monkeypatch.delenv("STEM_RESULT_BACKEND_URL", raising=False)
    app = stem.default_app()
    assert (app.broker_url, app.namespace) == (url, namespace)
    assert stem.default_app() is app  # built once
    workers = worker_app(url, namespace)
    tid = await stem.enqueue("email.send", to="b")
    async with running_worker(workers):
        assert (await stem.wait(tid, timeout=10)).value == "sent to b"


PRODUCER = textwrap.dedent("""
    import stem

    # The environment's app, no routes: email.send goes to the default queue.
    print(stem.enqueue_sync("email.send", to="env"))
    stem.set_default_app(stem.Stem.from_env(routes={"payments.*": "payments"}))
    print(stem.enqueue_sync("payments.charge", amount=3, to="script"))
""")


@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if a != "memory"])
def test_a_script_that_imports_no_handler_enqueues_and_exits(
        adapter: str, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = adapter_url(adapter, namespace, tmp_path, request)
    env = {**os.environ, "STEM_BROKER_URL": url, "STEM_NAMESPACE": namespace}
    env.pop("STEM_RESULT_BACKEND_URL", None)
    # A real interpreter exit: the portal's stores are closed and the process ends.
    proc = subprocess.run([sys.executable, "-c", PRODUCER], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    email_id, charge_id = proc.stdout.split()
    workers = worker_app(url, namespace)

    async def pending() -> dict[str, int]:
        return {q: (await workers.broker.stats(q)).pending for q in ("default", "payments")}

    assert asyncio.run(pending()) == {"default": 1, "payments": 1}
    try:
        with worker_thread(workers):
            assert workers.wait_sync(charge_id, timeout=10).value == "charged 3 to script"
            assert workers.wait_sync(email_id, timeout=10).value == "sent to env"
    finally:
        workers.close_sync()
