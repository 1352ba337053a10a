"""The beat on the memory stores: dispatch, bookkeeping, missed runs, runtime changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import stem
from stem.adapters.memory import MemoryStore
from stem.beat import Beat, ScheduleEntry
from stem.beat.beat import LEADER_KEY, sync_entries
from stem.beat.specs import normalize_spec
from stem.envelope import Envelope
from tests.helpers import capture_stem_logs, eventually


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("beat", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


@pytest.fixture
def store(app: stem.Stem, namespace: str) -> MemoryStore:
    return MemoryStore(f"memory://{namespace}", namespace=app.namespace)


def entry(entry_id: str, spec: Any, **kw: Any) -> ScheduleEntry:
    return ScheduleEntry(id=entry_id, task=kw.pop("task", "reports.send"),
                         spec=normalize_spec(spec), **kw)


async def queued(store: MemoryStore, queue: str = "default") -> list[Envelope]:
    out = []
    while True:
        got = await store.broker.fetch([queue], 100, block=0, consumer="test")
        if not got:
            return out
        out += [d.envelope for d in got if d.envelope is not None]


@pytest.fixture
async def running(app: stem.Stem, store: MemoryStore) -> AsyncIterator[Beat]:
    beat = Beat(app, schedules=store.schedules, locks=store.locks, tick=0.05, max_interval=0.2)
    task = asyncio.create_task(beat.run())
    yield beat
    beat.request_stop()
    await asyncio.wait_for(task, 10)


async def test_a_due_entry_is_enqueued_with_the_beat_headers_and_bookkeeping(
        app: stem.Stem, store: MemoryStore) -> None:
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # stores keep milliseconds
    await store.schedules.upsert(entry(
        "nightly", {"kind": "interval", "everyMs": 60_000}, args={"to": "ops"},
        kwargs={"legacy": 1}, queue="reports", meta={"team": "ops"},
        next_run_at=now - timedelta(seconds=1)))
    beat = Beat(app, schedules=store.schedules, locks=store.locks)
    with capture_stem_logs() as logs:
        assert await beat.run_once() == 1
    [env] = await queued(store, "reports")
    assert env.name == "reports.send" and env.args == {"to": "ops"}
    assert env.headers["scheduled-from"] == "beat" and env.headers["schedule-id"] == "nightly"
    assert env.meta["team"] == "ops" and env.meta["kwargs"] == {"legacy": 1}
    stored = await store.schedules.get("nightly")
    assert stored is not None and stored.total_run_count == 1 and stored.last_error is None
    assert stored.last_run_at is not None and stored.last_success_at == stored.last_run_at
    assert stored.next_run_at == now - timedelta(seconds=1) + timedelta(minutes=1)  # phase kept
    assert stored.drift_ms is not None and stored.drift_ms >= 1000 and stored.version == 2
    [run] = await store.schedules.history("nightly")
    assert run.success and run.scheduled_at == now - timedelta(seconds=1)
    assert (await app.get_result(env.id)) is not None      # a status exists: "queued"
    dispatched = [e for e in logs if e["event"] == "beat.dispatched"]
    assert dispatched and dispatched[0]["drift_ms"] >= 1000
    assert await store.locks.owner_of(LEADER_KEY) == beat.id   # the leader lease


async def test_down_for_five_periods_fires_once_then_follows_the_schedule(
        app: stem.Stem, store: MemoryStore) -> None:
    now = datetime.now(UTC)
    await store.schedules.upsert(entry("every10", "every:10s",
                                       next_run_at=now - timedelta(seconds=50)))
    await store.schedules.upsert(entry("skipper", "every:10s", meta={"stem.catchUp": "skip"},
                                       next_run_at=now - timedelta(seconds=50)))
    beat = Beat(app, schedules=store.schedules)
    assert await beat.run_once(now) == 1
    assert await beat.run_once(now + timedelta(seconds=1)) == 0
    envs = await queued(store)
    assert [e.headers["schedule-id"] for e in envs] == ["every10"]
    for entry_id in ("every10", "skipper"):
        stored = await store.schedules.get(entry_id)
        assert stored is not None and now < stored.next_run_at <= now + timedelta(seconds=10)
    skipper = await store.schedules.get("skipper")
    assert skipper is not None and skipper.total_run_count == 0
    assert "stem.catchUp" not in envs[0].meta


async def test_a_slightly_late_skip_entry_still_fires(app: stem.Stem, store: MemoryStore) -> None:
    now = datetime.now(UTC)
    await store.schedules.upsert(entry("skipper", "every:10s", meta={"stem.catchUp": "skip"},
                                       next_run_at=now - timedelta(seconds=1)))
    assert await Beat(app, schedules=store.schedules).run_once(now) == 1


async def test_clocked_fires_once_and_disables(app: stem.Stem, store: MemoryStore) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    await store.schedules.upsert(entry("once", {"kind": "clocked", "runAt": at.isoformat()},
                                       next_run_at=at))
    beat = Beat(app, schedules=store.schedules)
    assert await beat.run_once() == 1
    assert await beat.run_once(datetime.now(UTC) + timedelta(days=1)) == 0
    stored = await store.schedules.get("once")
    assert stored is not None and not stored.enabled and stored.next_run_at is None


async def test_only_the_leader_dispatches(app: stem.Stem, store: MemoryStore) -> None:
    await store.schedules.upsert(entry("held", "every:1s",
                                       next_run_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert await store.locks.acquire(LEADER_KEY, "another-beat", 5)
    follower = Beat(app, schedules=store.schedules, locks=store.locks)
    assert await follower.run_once() == 0 and not follower.is_leader
    assert await queued(store) == []
    assert await store.locks.release(LEADER_KEY, "another-beat")  # the leader stops
    assert await follower.run_once() == 1 and follower.is_leader


async def test_an_enqueue_failure_is_recorded_and_the_beat_goes_on(
        app: stem.Stem, store: MemoryStore) -> None:
    now = datetime.now(UTC) - timedelta(seconds=1)
    await store.schedules.upsert(entry("bad", "every:60s", args={"x": {1, 2}}, next_run_at=now))
    await store.schedules.upsert(entry("good", "every:60s", next_run_at=now))
    failures: list[Any] = []
    stem.signals.schedule_entry_failed.connect(receiver := lambda _s, **kw: failures.append(kw))
    try:
        with capture_stem_logs() as logs:
            assert await Beat(app, schedules=store.schedules).run_once() == 1
    finally:
        stem.signals.schedule_entry_failed.disconnect(receiver)
    bad = await store.schedules.get("bad")
    assert bad is not None and bad.last_error and bad.last_error_at and bad.total_run_count == 1
    assert bad.next_run_at is not None and bad.next_run_at > now     # tried again next period
    assert [e["entry"] for e in logs if e["event"] == "beat.failed"] == ["bad"]
    assert failures and failures[0]["entry"].id == "bad"
    assert [e.headers["schedule-id"] for e in await queued(store)] == ["good"]


async def test_a_running_beat_picks_up_added_and_disabled_entries(
        store: MemoryStore, running: Beat) -> None:
    # Added without a next run: the beat's periodic re-read gives it one.
    await store.schedules.upsert(entry("fresh", "every:0.1s"))
    await eventually(lambda: _count(store, "fresh", 2), timeout=10)
    current = await store.schedules.get("fresh")
    assert current is not None
    await store.schedules.upsert(current.copy(enabled=False), expected_version=current.version)
    stopped = await store.schedules.get("fresh")
    assert stopped is not None
    count = stopped.total_run_count
    await asyncio.sleep(0.5)  # several beat ticks: a disabled entry must stay quiet
    after = await store.schedules.get("fresh")
    assert after is not None and after.total_run_count == count


async def _count(store: MemoryStore, entry_id: str, at_least: int) -> bool:
    got = await store.schedules.get(entry_id)
    return got is not None and got.total_run_count >= at_least


async def test_code_declared_entries_are_merged(app: stem.Stem, store: MemoryStore) -> None:
    @app.periodic("*/5 * * * *", tz="Europe/Paris", args=("ops",))
    @app.task(name="reports.send")
    async def send(to: str) -> str:
        return to

    app.add_periodic_task(30, "reports.send", name="fast", kwargs={"to": "dev"}, queue="q2")
    with pytest.raises(stem.ConfigurationError, match="declared twice"):
        app.add_periodic_task(30, send, name="fast", args=["x"])
    with pytest.raises(stem.ConfigurationError, match="'broken'"):
        app.add_periodic_task("every:soon", send, name="broken")
    await store.schedules.upsert(entry("store-only", "every:60s"))
    await sync_entries(store.schedules, app.periodic_tasks)
    first = await store.schedules.get("reports.send")
    assert first is not None and first.args == {"to": "ops"} and first.timezone == "Europe/Paris"
    assert first.spec == {"kind": "cron", "expression": "*/5 * * * *"} and first.next_run_at
    # Run bookkeeping survives a redeploy; the declared fields win over store edits.
    ran = await store.schedules.upsert(first.copy(total_run_count=7, queue="edited"),
                                       expected_version=first.version)
    app.periodic_tasks[0] = app.periodic_tasks[0].copy(args={"to": "all"})
    await sync_entries(store.schedules, app.periodic_tasks)
    merged = await store.schedules.get("reports.send")
    assert merged is not None and merged.total_run_count == 7 and merged.queue == "default"
    assert merged.args == {"to": "all"} and merged.next_run_at == ran.next_run_at
    fast = await store.schedules.get("fast")
    assert fast is not None and fast.queue == "q2" and fast.spec["everyMs"] == 30_000
    assert await store.schedules.get("store-only") is not None


class CountingSchedules:
    """The memory schedule store, counting ``mark_runs`` batches (or failing them)."""

    def __init__(self, inner: Any, fail: bool = False) -> None:
        self.inner, self.fail = inner, fail
        self.batches: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def mark_runs(self, runs: Any) -> Any:
        self.batches.append([m.entry_id for m in runs])
        if self.fail:
            raise ConnectionError("store down")
        return await self.inner.mark_runs(runs)


async def test_entries_due_together_are_recorded_in_one_batch(
        app: stem.Stem, store: MemoryStore) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    for n in range(5):
        await store.schedules.upsert(entry(f"e{n}", "every:60s", next_run_at=due))
    schedules = CountingSchedules(store.schedules)
    beat = Beat(app, schedules=schedules, locks=store.locks)  # type: ignore[arg-type]
    assert await beat.run_once() == 5
    assert schedules.batches == [[f"e{n}" for n in range(5)]]
    assert all(e.total_run_count == 1 for e in await store.schedules.entries())


async def test_a_failed_batch_is_reported_per_entry_and_the_beat_goes_on(
        app: stem.Stem, store: MemoryStore) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    for n in range(3):
        await store.schedules.upsert(entry(f"e{n}", "every:60s", next_run_at=due))
    failed: list[str] = []

    def on_failed(sender: Any, **kw: Any) -> None:
        failed.append(kw["entry"].id)

    stem.signals.schedule_entry_failed.connect(on_failed)
    try:
        failing = CountingSchedules(store.schedules, fail=True)
        beat = Beat(app, schedules=failing, locks=store.locks)  # type: ignore[arg-type]
        with capture_stem_logs() as logs:
            assert await beat.run_once() == 3  # enqueued; only the record failed
    finally:
        stem.signals.schedule_entry_failed.disconnect(on_failed)
    assert sorted(failed) == ["e0", "e1", "e2"]
    assert sum(e["event"] == "beat.failed" for e in logs) == 3
    assert len(await queued(store)) == 3
