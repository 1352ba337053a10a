"""``expires`` and ``ignore_result``: the producer's meta keys (the Dart Stem's
``stem.expiresAt`` / ``stem.ignoreResult``) and what the worker does with them (memory)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import stem
from stem import TaskState
from stem._time import from_iso, utcnow
from stem.errors import ConfigurationError, TaskFailedError
from stem.task import META_EXPIRES_AT, META_IGNORE_RESULT, TaskOptions
from stem.worker.processor import ignore_result_flag
from tests.helpers import capture_stem_logs, eventually, running_worker

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


def _past() -> datetime:
    return datetime.now(UTC) - timedelta(seconds=1)


# -- producer: what goes on the wire ---------------------------------------------------


def test_expires_in_seconds_becomes_an_absolute_utc_time_at_enqueue(app: stem.Stem) -> None:
    task = app.definition("t.report")
    before = utcnow()
    env = app.build_envelope(task.call().with_options(expires=30))
    text = env.meta[META_EXPIRES_AT]
    assert text.endswith("Z") and len(text) == len("2026-01-03T12:45:00.000Z")
    deadline = from_iso(text)
    assert before + timedelta(seconds=29.9) <= deadline <= utcnow() + timedelta(seconds=30)
    assert META_IGNORE_RESULT not in env.meta


def test_an_aware_datetime_is_written_in_utc_as_the_dart_stem_writes_it(app: stem.Stem) -> None:
    at = datetime(2026, 1, 3, 14, 45, tzinfo=timezone(timedelta(hours=2)))
    env = app.build_envelope(app.definition("t.x").call().with_options(expires=at))
    assert env.meta[META_EXPIRES_AT] == "2026-01-03T12:45:00.000Z"  # Dart's own test value


def test_task_defaults_apply_per_enqueue_and_a_call_overrides_them(app: stem.Stem) -> None:
    @app.task(name="t.defaults", expires=60, ignore_result=True)
    def defaults() -> None: ...

    env = app.build_envelope(defaults.call())
    assert env.meta[META_IGNORE_RESULT] is True
    assert from_iso(env.meta[META_EXPIRES_AT]) > utcnow() + timedelta(seconds=59)
    # An explicit False is written, so it wins over the worker's task option too.
    env = app.build_envelope(defaults.call().with_options(ignore_result=False, expires=5))
    assert env.meta[META_IGNORE_RESULT] is False
    assert from_iso(env.meta[META_EXPIRES_AT]) < utcnow() + timedelta(seconds=6)


async def test_enqueue_and_the_module_api_take_the_options(app: stem.Stem) -> None:
    tid = await app.enqueue("t.any", expires=10, ignore_result=True)
    stem.set_default_app(app)
    try:
        tid2 = await stem.enqueue("t.any", expires=_past())
    finally:
        stem.set_default_app(None)
    first, second = [d.envelope for d in await app.broker.fetch(["default"], 2, block=0,
                                                                consumer="c")]
    assert first is not None and second is not None
    assert (first.id, second.id) == (tid, tid2)
    assert first.meta[META_IGNORE_RESULT] is True and META_EXPIRES_AT in first.meta
    assert from_iso(second.meta[META_EXPIRES_AT]) < utcnow()


@pytest.mark.parametrize("bad", [-1, -0.001, float("inf"), float("nan"), True, "10",
                                 datetime(2030, 1, 1)])
def test_unusable_expires_is_refused(app: stem.Stem, bad: Any) -> None:
    call = app.definition("t.x").call()
    with pytest.raises(ConfigurationError, match="expires"):
        call.with_options(expires=bad)


def test_unusable_task_defaults_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="expires"):
        TaskOptions(expires=-5)
    with pytest.raises(ConfigurationError, match="per call"):
        TaskOptions(expires=datetime.now(UTC))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="ignore_result"):
        TaskOptions(ignore_result="yes")  # type: ignore[arg-type]


def test_expires_beyond_what_a_datetime_holds_is_refused_at_enqueue(app: stem.Stem) -> None:
    with pytest.raises(ConfigurationError, match="9999"):
        app.build_envelope(app.definition("t.x").call().with_options(expires=1e15))


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), (1, True), (0, False), (2.5, True), (0.0, False),
    ("true", True), ("TRUE", True), ("1", True), ("Yes", True), (" yes ", True),
    ("false", False), ("no", False), ("0", False), ("", False), (None, False),
    ({"x": 1}, False), ([True], False),
])
def test_ignore_result_flag_reads_what_producers_write(value: Any, expected: bool) -> None:
    assert ignore_result_flag(value) is expected


# -- worker: expiry ----------------------------------------------------------------------


async def test_a_task_past_its_deadline_is_cancelled_without_running(app: stem.Stem) -> None:
    ran: list[int] = []

    @app.task(name="t.late")
    def late(n: int) -> int:
        ran.append(n)
        return n

    with capture_stem_logs() as logs:
        async with running_worker(app):
            tid = await app.enqueue("t.late", 1, expires=_past())
            res = await app.wait(tid, timeout=10)
            with pytest.raises(TaskFailedError, match="TaskExpired"):
                await app.wait(tid, timeout=10, raise_on_failure=True)
            # Acked: neither waiting, leased nor dead-lettered.
            stats = await eventually(lambda: _settled(app))
    assert ran == []
    assert res.state is TaskState.CANCELLED and res.value is None and res.attempt == 0
    assert res.error is not None
    assert (res.error.type, res.error.message) == ("TaskExpired", "Task expired before execution")
    assert res.meta["stem.expired"] is True
    assert from_iso(res.meta["expiredAt"]) >= from_iso(res.meta[META_EXPIRES_AT])
    assert (res.meta["task"], res.meta["queue"]) == ("t.late", "default")
    assert "startedAt" not in res.meta  # it never started
    assert stats.dead == 0
    (line,) = [e for e in logs if e["event"] == "task.expired"]
    assert (line["task"], line["task_id"], line["state"], line["log_level"]) == (
        "t.late", tid, "cancelled", "warning")
    assert not [e for e in logs if e["event"] in ("task.succeeded", "task.failed")]


async def test_a_task_within_its_deadline_runs(app: stem.Stem) -> None:
    @app.task(name="t.soon")
    async def soon(n: int) -> int:
        return n * 2

    async with running_worker(app):
        res = await soon.wait(
            await app.enqueue_call(soon.call(4).with_options(expires=60)), timeout=10)
    assert res.state is TaskState.SUCCEEDED and res.value == 8
    assert META_EXPIRES_AT in res.meta and "stem.expired" not in res.meta


async def test_an_expiry_before_the_countdown_cancels_the_task(app: stem.Stem) -> None:
    ran: list[bool] = []

    @app.task(name="t.delayed")
    async def delayed() -> None:
        ran.append(True)

    async with running_worker(app):
        tid = await app.enqueue("t.delayed", countdown=0.3, expires=0.05)
        res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.CANCELLED and ran == []


async def test_a_retry_due_after_the_deadline_is_cancelled(app: stem.Stem) -> None:
    attempts: list[int] = []
    deadline = datetime.now(UTC) + timedelta(seconds=1)

    @app.task(name="t.retry_late", max_retries=3)
    async def retry_late(ctx: stem.TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise stem.Retry(eta=deadline + timedelta(milliseconds=100))

    async with running_worker(app):
        tid = await app.enqueue("t.retry_late", expires=deadline)
        res = await app.wait(tid, timeout=10)
        await eventually(lambda: _settled(app))
    assert attempts == [0]
    assert res.state is TaskState.CANCELLED and res.attempt == 1
    assert res.error is not None and res.error.type == "TaskExpired"


async def test_a_prefetched_task_whose_deadline_passes_while_it_waits_is_cancelled(
        app: stem.Stem) -> None:
    release = asyncio.Event()
    ran: list[str] = []

    @app.task(name="t.blocker")
    async def blocker() -> None:
        await release.wait()

    @app.task(name="t.waiting")
    async def waiting() -> None:
        ran.append("waiting")

    async with running_worker(app, concurrency=1) as worker:
        first = await app.enqueue("t.blocker")
        deadline = datetime.now(UTC) + timedelta(seconds=0.3)
        second = await app.enqueue("t.waiting", expires=deadline)
        # Fetched before its deadline, so it waits in the prefetch buffer...
        await eventually(lambda: _true(any(p.envelope.id == second
                                           for _, p in worker._waiting)))
        # ...until after it (a condition on the clock, not a fixed sleep).
        await eventually(lambda: _true(utcnow() > deadline))
        release.set()
        res = await app.wait(second, timeout=10)
        assert (await app.wait(first, timeout=10)).succeeded
    assert res.state is TaskState.CANCELLED and ran == []


@pytest.mark.parametrize("bad", ["soon", "", 1767225600, {"at": "2026-01-01"}])
async def test_an_unreadable_deadline_dead_letters_the_delivery(app: stem.Stem, bad: Any) -> None:
    ran: list[bool] = []

    @app.task(name="t.bad_deadline")
    async def bad_deadline() -> None:
        ran.append(True)

    async with running_worker(app):
        call = bad_deadline.call().with_options(meta={META_EXPIRES_AT: bad})
        res = await app.wait(await app.enqueue_call(call), timeout=10)
        (dead,) = await eventually(lambda: app.broker.dead_letters("default"))
    assert ran == []
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "EnvelopeDecodeError"
    assert "invalid envelope" in dead.reason and META_EXPIRES_AT in dead.reason
    assert res.meta["deadLetterReason"] == dead.reason


# -- worker: ignore_result -----------------------------------------------------------------


async def test_ignore_result_per_call_stores_success_without_the_value(app: stem.Stem) -> None:
    @app.task(name="t.value")
    async def value() -> object:
        return object()  # no encoder takes it: with ignore_result nobody needs to

    async with running_worker(app):
        tid = await app.enqueue("t.value", ignore_result=True)
        res = await app.wait(tid, timeout=10, raise_on_failure=True)
        stored = await app.backend.get(tid)
    assert res.state is TaskState.SUCCEEDED and res.value is None and res.raw_payload is None
    assert stored is not None and stored.payload is None and stored.to_dict()["payload"] is None
    assert res.unwrap() is None and "completedAt" in res.meta


async def test_ignore_result_per_task_and_a_call_that_wants_the_value(app: stem.Stem) -> None:
    @app.task(name="t.quiet", ignore_result=True)
    def quiet(n: int) -> int:
        return n + 1

    async with running_worker(app):
        ignored = await quiet.wait(await quiet.enqueue(1), timeout=10)
        kept = await quiet.wait(await app.enqueue_call(
            quiet.call(2).with_options(ignore_result=False)), timeout=10)
        # A producer that does not know the task's options: the worker's option applies.
        by_name = await app.wait(await app.enqueue_call(
            stem.TaskDefinition[..., int]("t.quiet").call(n=3)), timeout=10)
    assert (ignored.state, ignored.value) == (TaskState.SUCCEEDED, None)
    assert (kept.state, kept.value) == (TaskState.SUCCEEDED, 3)
    assert (by_name.state, by_name.value) == (TaskState.SUCCEEDED, None)


async def test_an_ignored_result_skips_the_tasks_decode(app: stem.Stem) -> None:
    @app.task(name="t.decoded", ignore_result=True, decode=lambda raw: int(raw["n"]))
    async def decoded() -> dict[str, int]:
        return {"n": 1}

    async with running_worker(app):
        res = await decoded.wait(await decoded.enqueue(), timeout=10)
    assert (res.state, res.value) == (TaskState.SUCCEEDED, None)
    assert res.meta[META_IGNORE_RESULT] is True


async def test_ignore_result_still_stores_failures(app: stem.Stem) -> None:
    @app.task(name="t.fails", ignore_result=True)
    async def fails() -> None:
        raise ValueError("kept")

    async with running_worker(app):
        res = await app.wait(await app.enqueue("t.fails"), timeout=10)
    assert res.state is TaskState.FAILED and res.error is not None
    assert (res.error.type, res.error.message) == ("ValueError", "kept")


# -- Dart-written envelopes ----------------------------------------------------------------


async def test_dart_envelopes_with_expiry_and_ignore_result_are_honoured(app: stem.Stem) -> None:
    days: list[str] = []

    @app.task(name="reports.build")
    def build(day: str) -> dict[str, str]:
        days.append(day)
        return {"day": day}

    expired_raw = (WIRE / "envelope_dart_expired.json").read_bytes()
    ignored_raw = (WIRE / "envelope_dart_ignore_result.json").read_bytes()
    async with running_worker(app):
        await app.broker.publish_raw("default", expired_raw)
        await app.broker.publish_raw("default", ignored_raw)
        expired = await app.wait("019610a2-5b7e-7c3d-9e21-4b5f6a7b8c01", timeout=10)
        ignored = await app.wait("019610a2-5b7e-7c3d-9e21-4b5f6a7b8c02", timeout=10)
    assert expired.state is TaskState.CANCELLED and expired.error is not None
    assert expired.error.type == "TaskExpired" and expired.meta["stem.expired"] is True
    # The deadline is kept exactly as Dart wrote it (microseconds).
    assert expired.meta[META_EXPIRES_AT] == "2025-03-21T10:20:30.123456Z"
    assert (ignored.state, ignored.value, ignored.raw_payload) == (
        TaskState.SUCCEEDED, None, None)
    assert days == ["2025-03-22"]


async def _settled(app: stem.Stem) -> Any:
    stats = await app.broker.stats("default")
    return stats if stats.pending == stats.delayed == stats.in_flight == 0 else None


async def _true(value: bool) -> bool:
    return value
