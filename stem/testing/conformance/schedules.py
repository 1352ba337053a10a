"""The ScheduleStore contract (:class:`stem.ports.ScheduleStore`) as a test class any
adapter can run: subclass :class:`ScheduleStoreConformance` and give it a
``schedule_store_factory`` fixture (see docs/conformance.md).

Times in the checks lie far in the past or future, so ``due(now)`` is seen to compare
with the ``now`` it is given, not with the store's clock.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_asyncio

from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.errors import ScheduleConflictError
from stem.ports import DEFAULT_SCHEDULE_HISTORY, ScheduleStore

__all__ = ["ScheduleStoreConformance", "ScheduleStoreFactory"]

#: Builds the schedule store under test (or an awaitable of it), on storage no other
#: test uses.
ScheduleStoreFactory = Callable[[], ScheduleStore | Awaitable[ScheduleStore]]

T0 = datetime(2001, 2, 3, 4, 5, 6, 789_000, tzinfo=UTC)
INTERVAL = {"kind": "interval", "everyMs": 30_000}


def at(seconds: float) -> datetime:
    """``T0`` plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def make(entry_id: str, **kw: Any) -> ScheduleEntry:
    kw.setdefault("task", "conf.tick")
    kw.setdefault("spec", dict(INTERVAL))
    return ScheduleEntry(id=entry_id, **kw)


def run(entry_id: str, scheduled: float, executed: float, *, success: bool = True,
        error: str | None = None, duration_ms: int = 5) -> ScheduleRun:
    return ScheduleRun(entry_id, at(scheduled), at(executed), success, duration_ms, error)


class ScheduleStoreConformance:
    """The checks every :class:`stem.ports.ScheduleStore` passes (Stem's adapters do).

    A subclass provides the ``schedule_store_factory`` fixture
    (:data:`ScheduleStoreFactory`); each test builds one store with it and closes it
    at the end. A store whose default history bound is not
    :data:`~stem.ports.DEFAULT_SCHEDULE_HISTORY` says so in ``expected_history_max``.
    """

    pytestmark = [pytest.mark.asyncio]
    #: ``history_max`` of a store built without a bound.
    expected_history_max: int = DEFAULT_SCHEDULE_HISTORY

    @pytest_asyncio.fixture
    async def schedules(self, schedule_store_factory: ScheduleStoreFactory
                        ) -> AsyncIterator[ScheduleStore]:
        """The schedule store under test, closed after the test."""
        made = schedule_store_factory()
        store = await made if inspect.isawaitable(made) else made
        try:
            yield store
        finally:
            await store.close()

    # -- upsert, get, entries, remove ------------------------------------------------

    async def test_upsert_creates_at_version_one(self, schedules: ScheduleStore) -> None:
        assert schedules.history_max == self.expected_history_max
        assert await schedules.get("a") is None
        before = datetime.now(UTC) - timedelta(seconds=5)
        stored = await schedules.upsert(make("a", next_run_at=at(0), version=7))
        assert stored.version == 1  # the stored version counts writes; entry.version is not read
        assert stored.created_at is not None and stored.updated_at is not None
        assert stored.created_at == stored.updated_at
        assert stored.created_at.tzinfo is not None and stored.created_at > before
        assert await schedules.get("a") == stored

    async def test_every_field_round_trips(self, schedules: ScheduleStore) -> None:
        entry = ScheduleEntry(
            id="full",
            task="conf.report",
            spec={"kind": "cron", "expression": "*/5 * * * *", "description": "five"},
            args={"n": 1, "nested": {"x": [1, 2.5, None, True]}, "text": "ü €"},
            kwargs={"flag": True},
            queue="reports",
            enabled=False,
            jitter_ms=250,
            timezone="Europe/Paris",
            expire_at=at(86_400),
            meta={"owner": "ops", "tags": ["a", "b"]},
            next_run_at=at(60),
            last_run_at=at(-60),
            last_jitter_ms=12,
            last_error="ValueError: boom",
            last_success_at=at(-120),
            last_error_at=at(-60),
            total_run_count=42,
            drift_ms=-3,
            created_at=at(-3600),
            extra={"dartOnly": {"k": [1, "two"]}, "other": "x"},
        )
        stored = await schedules.upsert(entry)
        assert stored == entry.copy(version=1, updated_at=stored.updated_at)
        got = await schedules.get("full")
        assert got == stored
        assert got is not None and got.to_dict() == stored.to_dict()
        assert await schedules.entries() == [stored]

    async def test_times_are_kept_to_the_millisecond_in_utc(self, schedules: ScheduleStore
                                                            ) -> None:
        paris = datetime(2001, 2, 3, 5, 5, 6, 789_654, tzinfo=UTC).astimezone(
            timezone(timedelta(hours=1)))
        stored = await schedules.upsert(make("t", next_run_at=paris, last_run_at=at(0)))
        assert stored.next_run_at == datetime(2001, 2, 3, 5, 5, 6, 789_000, tzinfo=UTC)
        got = await schedules.get("t")
        assert got is not None and got.next_run_at == stored.next_run_at
        assert got.next_run_at is not None and got.next_run_at.utcoffset() == timedelta(0)
        assert got.last_run_at == T0

    async def test_upsert_replaces_and_keeps_created_at(self, schedules: ScheduleStore) -> None:
        first = await schedules.upsert(make("a", queue="q1", meta={"v": 1}, next_run_at=at(0)))
        second = await schedules.upsert(make("a", queue="q2", task="conf.other",
                                             created_at=at(-999), next_run_at=at(5)))
        assert second.version == 2
        assert second.created_at == first.created_at
        assert second.queue == "q2" and second.task == "conf.other" and second.meta == {}
        assert await schedules.get("a") == second

    async def test_expected_version_guards_every_write(self, schedules: ScheduleStore) -> None:
        # 0: the entry must not exist yet.
        created = await schedules.upsert(make("a"), expected_version=0)
        assert created.version == 1
        with pytest.raises(ScheduleConflictError) as info:
            await schedules.upsert(make("a", queue="lost"), expected_version=0)
        assert (info.value.entry_id, info.value.expected, info.value.actual) == ("a", 0, 1)
        # The version read is still the stored one: the write goes through.
        updated = await schedules.upsert(make("a", queue="won"), expected_version=1)
        assert updated.version == 2
        # A stale version loses, and changes nothing.
        with pytest.raises(ScheduleConflictError) as info:
            await schedules.upsert(make("a", queue="stale"), expected_version=1)
        assert (info.value.expected, info.value.actual) == (1, 2)
        # An entry that does not exist is at no version at all.
        with pytest.raises(ScheduleConflictError) as info:
            await schedules.upsert(make("missing"), expected_version=3)
        assert (info.value.entry_id, info.value.expected, info.value.actual) == (
            "missing", 3, None)
        assert await schedules.get("missing") is None
        got = await schedules.get("a")
        assert got is not None and got.queue == "won" and got.version == 2

    async def test_concurrent_guarded_writes_exactly_one_wins(self, schedules: ScheduleStore
                                                              ) -> None:
        await schedules.upsert(make("a"))
        outcomes = await asyncio.gather(
            *(schedules.upsert(make("a", queue=f"q{n}"), expected_version=1) for n in range(8)),
            return_exceptions=True)
        won = [o for o in outcomes if isinstance(o, ScheduleEntry)]
        assert len(won) == 1 and won[0].version == 2
        assert all(isinstance(o, ScheduleConflictError) for o in outcomes if o is not won[0])
        assert await schedules.get("a") == won[0]

    async def test_entries_are_ordered_by_id(self, schedules: ScheduleStore) -> None:
        assert await schedules.entries() == []
        for entry_id in ("b", "c", "a", "a:b", "index"):
            await schedules.upsert(make(entry_id))
        assert [e.id for e in await schedules.entries()] == ["a", "a:b", "b", "c", "index"]

    async def test_ids_with_any_characters(self, schedules: ScheduleStore) -> None:
        ids = ["a:history", "a", "{x}", "index", "50%", "ü b/c"]
        for n, entry_id in enumerate(ids):
            await schedules.upsert(make(entry_id, next_run_at=at(n)))
            await schedules.mark_run(run(entry_id, n, n), expected_version=1,
                                     next_run_at=at(100 + n))
        for entry_id in ids:
            got = await schedules.get(entry_id)
            assert got is not None and got.id == entry_id and got.version == 2
            assert len(await schedules.history(entry_id)) == 1
        assert [e.id for e in await schedules.due(at(1000))] == ids

    async def test_remove_deletes_the_entry_and_its_history(self, schedules: ScheduleStore
                                                            ) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        await schedules.upsert(make("b", next_run_at=at(0)))
        await schedules.mark_run(run("a", 0, 0), expected_version=1, next_run_at=at(10))
        await schedules.mark_run(run("b", 0, 0), expected_version=1, next_run_at=at(10))
        assert await schedules.remove("a")
        assert await schedules.get("a") is None
        assert await schedules.history("a") == []
        assert [e.id for e in await schedules.due(at(100))] == ["b"]
        assert not await schedules.remove("a")
        assert len(await schedules.history("b")) == 1
        # A new entry of the same id starts afresh.
        again = await schedules.upsert(make("a"), expected_version=0)
        assert again.version == 1 and await schedules.history("a") == []

    # -- due -------------------------------------------------------------------------

    async def test_due_is_soonest_first_limited_and_enabled_only(self, schedules: ScheduleStore
                                                                 ) -> None:
        await schedules.upsert(make("late", next_run_at=at(30)))
        await schedules.upsert(make("early", next_run_at=at(10)))
        await schedules.upsert(make("mid", next_run_at=at(20)))
        await schedules.upsert(make("now", next_run_at=at(40)))
        await schedules.upsert(make("future", next_run_at=at(41)))
        await schedules.upsert(make("off", next_run_at=at(5), enabled=False))
        await schedules.upsert(make("unplanned"))
        assert [e.id for e in await schedules.due(at(40))] == ["early", "mid", "late", "now"]
        assert [e.id for e in await schedules.due(at(40), limit=2)] == ["early", "mid"]
        assert await schedules.due(at(40), limit=0) == []
        assert await schedules.due(at(9.999)) == []
        due = await schedules.due(at(100))
        assert [e.id for e in due] == ["early", "mid", "late", "now", "future"]
        assert due[0] == await schedules.get("early")

    async def test_due_compares_with_the_given_now(self, schedules: ScheduleStore) -> None:
        far = datetime(2200, 1, 1, tzinfo=UTC)
        await schedules.upsert(make("far", next_run_at=far))
        assert await schedules.due(far - timedelta(milliseconds=1)) == []
        assert [e.id for e in await schedules.due(far)] == ["far"]
        naive_past = datetime(2001, 1, 1)  # naive: UTC
        await schedules.upsert(make("old", next_run_at=at(0)))
        assert await schedules.due(naive_past) == []

    async def test_upsert_moves_an_entry_in_and_out_of_due(self, schedules: ScheduleStore
                                                           ) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        await schedules.upsert(make("b", next_run_at=at(10)))
        await schedules.upsert(make("a", next_run_at=at(20)))
        assert [e.id for e in await schedules.due(at(30))] == ["b", "a"]
        await schedules.upsert(make("b", next_run_at=at(10), enabled=False))
        assert [e.id for e in await schedules.due(at(30))] == ["a"]
        await schedules.upsert(make("a"))  # no next run
        assert await schedules.due(at(30)) == []
        await schedules.upsert(make("b", next_run_at=at(10)))
        assert [e.id for e in await schedules.due(at(30))] == ["b"]

    # -- mark_run and history --------------------------------------------------------

    async def test_mark_run_records_a_success(self, schedules: ScheduleStore) -> None:
        stored = await schedules.upsert(make("a", next_run_at=at(0), last_error="old",
                                             last_error_at=at(-5)))
        r = run("a", 0, 0.25, duration_ms=40)
        marked = await schedules.mark_run(r, expected_version=stored.version,
                                          next_run_at=at(30), jitter_ms=7)
        assert marked is not None
        assert marked.version == stored.version + 1
        assert marked.last_run_at == at(0.25)
        assert marked.next_run_at == at(30)
        assert marked.total_run_count == 1
        assert marked.drift_ms == 250
        assert marked.last_jitter_ms == 7
        assert marked.last_success_at == at(0.25)
        assert marked.last_error is None and marked.last_error_at == at(-5)
        assert marked.enabled
        assert marked.created_at == stored.created_at
        assert marked.updated_at is not None and stored.updated_at is not None
        assert marked.updated_at >= stored.updated_at
        # Everything else is untouched.
        assert (marked.task, marked.spec, marked.queue, marked.meta) == (
            stored.task, stored.spec, stored.queue, stored.meta)
        assert await schedules.get("a") == marked
        assert await schedules.history("a") == [r]
        assert await schedules.due(at(29)) == []
        assert [e.id for e in await schedules.due(at(30))] == ["a"]

    async def test_mark_run_records_a_failure(self, schedules: ScheduleStore) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        ok = await schedules.mark_run(run("a", 0, 0), expected_version=1, next_run_at=at(30))
        assert ok is not None
        bad = run("a", 30, 29.5, success=False, error="KeyError: 'x'")
        marked = await schedules.mark_run(bad, expected_version=2, next_run_at=at(60))
        assert marked is not None and marked.version == 3
        assert marked.last_error == "KeyError: 'x'"
        assert marked.last_error_at == at(29.5)
        assert marked.last_success_at == at(0)
        assert marked.drift_ms == -500
        assert marked.total_run_count == 2
        assert marked.last_jitter_ms == 0
        assert await schedules.get("a") == marked

    async def test_mark_run_on_a_stale_version_changes_nothing(self, schedules: ScheduleStore
                                                               ) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        current = await schedules.upsert(make("a", next_run_at=at(0), queue="edited"))
        assert await schedules.mark_run(run("a", 0, 0), expected_version=1,
                                        next_run_at=at(30)) is None
        assert await schedules.get("a") == current
        assert await schedules.history("a") == []
        assert await schedules.mark_run(run("gone", 0, 0), expected_version=1,
                                        next_run_at=at(30)) is None
        assert await schedules.get("gone") is None and await schedules.history("gone") == []

    async def test_concurrent_mark_runs_exactly_one_wins(self, schedules: ScheduleStore) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        marked = await asyncio.gather(*(
            schedules.mark_run(run("a", 0, n), expected_version=1, next_run_at=at(30))
            for n in range(8)))
        won = [m for m in marked if m is not None]
        assert len(won) == 1 and won[0].version == 2 and won[0].total_run_count == 1
        assert len(await schedules.history("a")) == 1

    async def test_mark_run_can_disable(self, schedules: ScheduleStore) -> None:
        await schedules.upsert(make("once", next_run_at=at(0)))
        marked = await schedules.mark_run(run("once", 0, 1), expected_version=1,
                                          next_run_at=at(30), disable=True)
        assert marked is not None
        assert not marked.enabled and marked.next_run_at is None
        assert marked.last_run_at == at(1) and marked.version == 2
        assert await schedules.due(at(1000)) == []
        assert await schedules.get("once") == marked

    async def test_mark_run_without_a_next_run(self, schedules: ScheduleStore) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        marked = await schedules.mark_run(run("a", 0, 1), expected_version=1, next_run_at=None)
        assert marked is not None and marked.enabled and marked.next_run_at is None
        assert await schedules.due(at(1000)) == []

    async def test_history_is_newest_first_and_limited(self, schedules: ScheduleStore) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        await schedules.upsert(make("other", next_run_at=at(0)))
        runs = [run("a", 10 * n, 10 * n + 1, success=n % 2 == 0,
                    error=None if n % 2 == 0 else f"E{n}") for n in range(5)]
        for n, r in enumerate(runs):
            assert await schedules.mark_run(r, expected_version=n + 1,
                                            next_run_at=at(10 * n + 10)) is not None
        await schedules.mark_run(run("other", 0, 0), expected_version=1, next_run_at=at(10))
        assert await schedules.history("a") == runs[::-1]
        assert await schedules.history("a", limit=2) == runs[:-3:-1]
        assert await schedules.history("a", limit=0) == []
        assert await schedules.history("missing") == []

    async def test_history_is_bounded(self, schedules: ScheduleStore) -> None:
        schedules.history_max = 3
        await schedules.upsert(make("a", next_run_at=at(0)))
        runs = [run("a", n, n) for n in range(7)]
        for n, r in enumerate(runs):
            assert await schedules.mark_run(r, expected_version=n + 1,
                                            next_run_at=at(n + 1)) is not None
        assert await schedules.history("a", limit=50) == runs[:-4:-1]
        entry = await schedules.get("a")
        assert entry is not None and entry.total_run_count == 7  # the count is not bounded

    # -- mark_runs (a batch) ----------------------------------------------------------

    async def test_mark_runs_records_each_run_as_mark_run_does(self, schedules: ScheduleStore
                                                               ) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        await schedules.upsert(make("b", next_run_at=at(0), last_error="old"))
        await schedules.upsert(make("c", next_run_at=at(0)))
        ra, rb = run("a", 0, 0.25, duration_ms=40), run("b", 0, 1, success=False, error="E")
        rc = run("c", 0, 0.5)
        marked = await schedules.mark_runs([
            MarkRun(ra, 1, at(30), jitter_ms=7),
            MarkRun(rb, 1, at(60)),
            MarkRun(rc, 1, at(30), disable=True),
        ])
        assert [m.id if m else None for m in marked] == ["a", "b", "c"]
        a, b, c = marked
        assert a is not None and b is not None and c is not None
        assert (a.version, a.last_run_at, a.next_run_at, a.drift_ms, a.last_jitter_ms,
                a.total_run_count, a.last_success_at) == (2, at(0.25), at(30), 250, 7, 1,
                                                          at(0.25))
        assert (b.last_error, b.last_error_at, b.last_success_at, b.next_run_at) == (
            "E", at(1), None, at(60))
        assert not c.enabled and c.next_run_at is None
        for entry in marked:
            assert entry is not None and await schedules.get(entry.id) == entry
        assert await schedules.history("a") == [ra]
        assert await schedules.history("b") == [rb]
        assert await schedules.history("c") == [rc]
        assert [e.id for e in await schedules.due(at(45))] == ["a"]

    async def test_mark_runs_stale_or_missing_entries_get_none_only(
            self, schedules: ScheduleStore) -> None:
        await schedules.upsert(make("a", next_run_at=at(0)))
        await schedules.upsert(make("b", next_run_at=at(0)))
        edited = await schedules.upsert(make("b", next_run_at=at(0), queue="edited"))  # v2
        await schedules.upsert(make("c", next_run_at=at(0)))
        marked = await schedules.mark_runs([
            MarkRun(run("a", 0, 0), 1, at(30)),
            MarkRun(run("b", 0, 0), 1, at(30)),      # stale: b is at version 2
            MarkRun(run("gone", 0, 0), 1, at(30)),   # no such entry
            MarkRun(run("c", 0, 0), 1, at(30)),
        ])
        assert [m.id if m else None for m in marked] == ["a", None, None, "c"]
        assert await schedules.get("b") == edited
        assert await schedules.history("b") == []
        assert await schedules.get("gone") is None and await schedules.history("gone") == []
        assert [len(await schedules.history(i)) for i in ("a", "c")] == [1, 1]

    async def test_mark_runs_of_nothing_does_nothing(self, schedules: ScheduleStore) -> None:
        assert await schedules.mark_runs([]) == []

    async def test_mark_runs_refuses_an_entry_twice(self, schedules: ScheduleStore) -> None:
        stored = await schedules.upsert(make("a", next_run_at=at(0)))
        with pytest.raises(ValueError):
            await schedules.mark_runs([MarkRun(run("a", 0, 0), 1, at(30)),
                                       MarkRun(run("a", 30, 30), 2, at(60))])
        assert await schedules.get("a") == stored and await schedules.history("a") == []

    async def test_concurrent_mark_runs_batches_each_entry_won_once(
            self, schedules: ScheduleStore) -> None:
        ids = [f"e{n}" for n in range(5)]
        for entry_id in ids:
            await schedules.upsert(make(entry_id, next_run_at=at(0)))
        batches = await asyncio.gather(*(
            schedules.mark_runs([MarkRun(run(i, 0, k), 1, at(30)) for i in ids[k % 2:] + ids[:k % 2]])
            for k in range(4)))
        for entry_id in ids:
            won = [m for batch in batches for m in batch if m is not None and m.id == entry_id]
            assert len(won) == 1 and won[0].version == 2 and won[0].total_run_count == 1
            assert len(await schedules.history(entry_id)) == 1

    async def test_mark_runs_bounds_each_history(self, schedules: ScheduleStore) -> None:
        schedules.history_max = 2
        for entry_id in ("a", "b"):
            await schedules.upsert(make(entry_id, next_run_at=at(0)))
        for n in range(4):
            marked = await schedules.mark_runs([MarkRun(run(i, n, n), n + 1, at(n + 1))
                                                for i in ("a", "b")])
            assert all(m is not None for m in marked)
        for entry_id in ("a", "b"):
            assert await schedules.history(entry_id) == [run(entry_id, n, n) for n in (3, 2)]

    async def test_history_never_shows_more_than_the_bound(self, schedules: ScheduleStore
                                                           ) -> None:
        # A store may delete the runs beyond the bound lazily (every few runs), but it
        # never returns them.
        schedules.history_max = 25
        for entry_id in ("a", "b"):
            await schedules.upsert(make(entry_id, next_run_at=at(0)))
        for n in range(31):
            marked = await schedules.mark_runs([MarkRun(run(i, n, n), n + 1, at(n + 1))
                                                for i in ("a", "b")])
            assert all(m is not None for m in marked)
            for entry_id in ("a", "b"):
                history = await schedules.history(entry_id, limit=1000)
                assert history == [run(entry_id, k, k) for k in range(n, max(n - 25, -1), -1)]

    async def test_bad_limits_are_refused(self, schedules: ScheduleStore) -> None:
        with pytest.raises(ValueError):
            await schedules.due(T0, limit=-1)
        with pytest.raises(ValueError):
            await schedules.history("a", limit=-1)
