"""Issue 9 (hardening), worker core: no envelope wedges a worker, one rule per bound.

Each test writes what a hostile or stale producer would straight into storage and
checks the delivery settles (ack, retry or dead letter) and the worker keeps serving.
The per-adapter ones run on every store (memory, sqlite, postgres, redis).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import stem
from stem import ExponentialJitterRetryStrategy, TaskState
from stem.envelope import Envelope, reset_payload_limit
from stem.errors import ConfigurationError, PayloadTooLargeError
from stem.worker import Worker
from tests.conformance.conftest import ADAPTERS, adapter_url
from tests.helpers import eventually, running_worker


@pytest.fixture(params=ADAPTERS)
async def app(request: pytest.FixtureRequest, namespace: str, tmp_path: Path
              ) -> AsyncIterator[stem.Stem]:
    url = adapter_url(request.param, namespace, tmp_path, request)
    a = stem.Stem("h", broker=url, backend=url, namespace=namespace)
    yield a
    await a.close()


@pytest.fixture
def memory_app(namespace: str) -> stem.Stem:
    return stem.Stem("h", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


@pytest.fixture
def small_payload_cap(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("STEM_MAX_PAYLOAD_BYTES", "4096")
    reset_payload_limit()
    yield 4096
    reset_payload_limit()


def raw(**fields: Any) -> bytes:
    return orjson.dumps({"args": {}, **fields})


async def settled(app: stem.Stem, queue: str = "default", *, dead: int,
                  delayed: int = 0) -> bool:
    s = await app.broker.stats(queue)
    return (s.pending, s.in_flight, s.dead, s.delayed) == (0, 0, dead, delayed)


async def reasons(app: stem.Stem, queue: str = "default") -> list[str]:
    return sorted(d.reason for d in await app.broker.dead_letters(queue))


# -- item 1: whatever classification raises, the delivery settles -------------------------

class _RaisingStrategy:
    def next_delay(self, attempt: int, error: BaseException | None) -> float:
        raise RuntimeError("strategy bug")


class _NaNStrategy:
    def next_delay(self, attempt: int, error: BaseException | None) -> float:
        return math.nan


async def test_hostile_retry_fields_and_strategies_settle_and_the_worker_keeps_serving(
        memory_app: stem.Stem) -> None:
    app = memory_app

    @app.task(name="boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.task(name="far")
    async def far() -> None:
        raise stem.Retry(countdown=1e300)

    @app.task(name="bad_strategy", max_retries=3, retry_strategy=_RaisingStrategy())
    async def bad_strategy() -> None:
        raise RuntimeError("first")

    @app.task(name="nan_strategy", max_retries=3, retry_strategy=_NaNStrategy())
    async def nan_strategy() -> None:
        raise RuntimeError("first")

    @app.task(name="ok")
    async def ok() -> str:
        return "ok"

    hostile = [
        Envelope(name="boom", attempt=1100, max_retries=2000),  # 2**1100 in the strategy
        Envelope(name="boom", meta={"__stemMaxRetries": "x"}),  # int("x") in the budget
        Envelope(name="far", max_retries=5),  # a countdown no date can hold
        Envelope(name="bad_strategy"),
        Envelope(name="nan_strategy"),
    ]
    await app.broker.publish(hostile)
    # One slot and no prefetch: before the fix, two wedged deliveries stopped all fetching.
    async with running_worker(app, concurrency=1, prefetch_multiplier=1):
        res = await app.wait(await app.enqueue("ok"), timeout=10)
        assert res.value == "ok"
        await eventually(lambda: settled(app, dead=2, delayed=3))
    states = {e.name + str(e.attempt): (await app.backend.get(e.id)) for e in hostile}
    assert {k: s.state if s else None for k, s in states.items()} == {
        "boom1100": TaskState.RETRIED, "boom0": TaskState.FAILED, "far0": TaskState.RETRIED,
        "bad_strategy0": TaskState.FAILED, "nan_strategy0": TaskState.RETRIED}
    far_status = states["far0"]
    assert far_status is not None and far_status.meta["retryDelayMs"] == 365 * 86_400_000
    dead = await reasons(app)
    assert any("'__stemMaxRetries' must be a whole number" in r for r in dead)
    assert any("worker error settling the task: RuntimeError('strategy bug')" in r for r in dead)


# -- item 3: leases outside the bounds --------------------------------------------------

async def test_leases_outside_the_bounds_are_dead_lettered_and_never_run(app: stem.Stem) -> None:
    runs: list[str] = []

    @app.task(name="lease")
    async def lease(ctx: stem.TaskContext) -> None:
        runs.append(ctx.id)

    for i, vt in enumerate([0, -5000, 1e16, "30000"]):
        await app.broker.publish_raw("default", raw(id=f"vt{i}", name="lease",
                                                    visibilityTimeout=vt))
    async with running_worker(app):
        await eventually(lambda: settled(app, dead=4))
        ok = await app.wait(await app.enqueue("lease"), timeout=10)
    assert ok.state is TaskState.SUCCEEDED and len(runs) == 1
    assert all("visibilityTimeout" in r for r in await reasons(app))
    status = await app.backend.get("vt0")
    assert status is not None and status.state is TaskState.FAILED


async def test_a_default_lease_outside_the_bounds_stops_the_worker_at_start(
        memory_app: stem.Stem) -> None:
    memory_app.broker.default_visibility_timeout = -1.0  # as if a bad URL got through
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        await Worker(memory_app).run()


async def test_extend_lease_outside_the_bounds_raises_in_the_handler(
        memory_app: stem.Stem) -> None:
    @memory_app.task(name="extend")
    async def extend(ctx: stem.TaskContext, seconds: float) -> str:
        try:
            ctx.extend_lease(seconds)
        except ConfigurationError as exc:
            return str(exc)
        return "extended"

    async with running_worker(memory_app):
        bad = await memory_app.wait(await memory_app.enqueue("extend", -1), timeout=5)
        good = await memory_app.wait(await memory_app.enqueue("extend", 5), timeout=5)
    assert "visibility timeout -1" in bad.value and good.value == "extended"


# -- item 8: a rejected delivery never overwrites a finished result ----------------------

async def test_a_rejected_delivery_keeps_a_finished_tasks_result(app: stem.Stem) -> None:
    @app.task(name="ok")
    async def ok() -> str:
        return "the result"

    async with running_worker(app):
        tid = await app.enqueue("ok")
        assert (await app.wait(tid, timeout=10)).value == "the result"
        # A bogus envelope reusing the id (unknown task), and undecodable bytes whose id
        # is still readable: both dead-lettered, the stored result untouched.
        await app.broker.publish_raw("default", raw(id=tid, name="nobody.home"))
        await app.broker.publish_raw("default", raw(id=tid, name="ok", attempt=-1))
        await eventually(lambda: settled(app, dead=2))
        fresh = Envelope(name="nobody.home")  # no status yet: the reject is recorded
        await app.broker.publish([fresh])
        failed = await app.wait(fresh.id, timeout=10)
    res = await app.get_result(tid)
    assert res is not None and res.state is TaskState.SUCCEEDED and res.value == "the result"
    assert failed.state is TaskState.FAILED and failed.error is not None
    assert failed.error.type == "UnknownTaskError"


# -- item 9: no id, priority ---------------------------------------------------------------

async def test_an_envelope_without_an_id_is_dead_lettered_with_the_reason(app: stem.Stem) -> None:
    @app.task(name="ok")
    async def ok() -> str:
        return "ok"

    await app.broker.publish_raw("default", raw(name="ok"))
    await app.broker.publish_raw("default", raw(name="ok", id=None, priority=42))
    async with running_worker(app):
        await eventually(lambda: settled(app, dead=2))
        assert (await app.wait(await app.enqueue("ok"), timeout=10)).value == "ok"
    assert await reasons(app) == ["undecodable envelope: envelope has no id"] * 2


async def test_priority_42_from_the_wire_runs_as_9(memory_app: stem.Stem) -> None:
    seen: list[int] = []

    @memory_app.task(name="p")
    async def p(ctx: stem.TaskContext) -> None:
        seen.append(ctx.envelope.priority)

    await memory_app.broker.publish_raw("default", raw(id="p1", name="p", priority=42))
    async with running_worker(memory_app):
        await memory_app.wait("p1", timeout=5)
    assert seen == [9]


# -- item 10: payload cap -----------------------------------------------------------------

async def test_an_oversized_envelope_is_dead_lettered_unparsed(app: stem.Stem,
                                                               small_payload_cap: int) -> None:
    @app.task(name="ok")
    async def ok(pad: str = "") -> int:
        return len(pad)

    big = raw(id="big1", name="ok", args={"pad": "x" * 6000})
    await app.broker.publish_raw("default", big)
    async with running_worker(app):
        await eventually(lambda: settled(app, dead=1))
        assert (await app.wait(await app.enqueue("ok", pad="y" * 100), timeout=10)).value == 100
    assert await reasons(app) == [
        f"undecodable envelope: envelope is {len(big)} bytes, over the 4096-byte payload "
        "limit (STEM_MAX_PAYLOAD_BYTES)"]
    assert await app.backend.get("big1") is None  # its id was never parsed out


async def test_enqueue_refuses_an_oversized_payload_and_publishes_nothing(
        memory_app: stem.Stem, small_payload_cap: int) -> None:
    @memory_app.task(name="ok")
    async def ok(pad: str) -> None: ...

    with pytest.raises(PayloadTooLargeError, match=r"task 'ok': envelope is \d+ bytes, "
                                                   r"over the 4096-byte payload limit"):
        await memory_app.enqueue("ok", pad="x" * 5000)
    results = await asyncio.gather(
        memory_app.enqueue("ok", pad="a"), memory_app.enqueue("ok", pad="x" * 5000),
        memory_app.enqueue("ok", pad="b"), return_exceptions=True)
    assert isinstance(results[1], PayloadTooLargeError)  # only its own caller fails
    with pytest.raises(PayloadTooLargeError):
        await memory_app.enqueue_many([ok.call(pad="x" * 5000)])
    assert (await memory_app.broker.stats("default")).pending == 2


async def test_retry_strategy_overflow_is_impossible_at_any_attempt() -> None:
    s = ExponentialJitterRetryStrategy(jitter=False)
    assert s.next_delay(1100, None) == s.max_delay
