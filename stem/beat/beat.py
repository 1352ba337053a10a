"""The beat: dispatches due schedule entries as tasks (``stem beat``).

One loop per process: ask the schedule store for the entries due now, dispatch each
under a lock (``stem:schedule:<id>`` in the lock store, owned by this beat), record the
run with the next run time, and sleep until the soonest known next run (at most
``tick`` seconds). Several beats may share one schedule store and one lock store: an
entry is dispatched by whichever takes its lock, and a beat that takes a lock re-reads
the entry first, so a run another beat already recorded is not dispatched twice.
Every ``max_interval`` seconds the beat re-reads all entries, to give new entries their
first run time (entries written with one are seen by the next ``due`` call anyway).

Missed runs: the next run is computed from the time of the dispatch, so an entry whose
beat was down for several periods fires once when it comes back, then follows its
schedule. An entry with ``meta["stem.catchUp"] = "skip"`` instead fires none of the
runs it missed by more than ``misfire_grace`` seconds: the beat moves it to its next
run without dispatching.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from stem._time import to_iso, utcnow
from stem.beat.entry import ScheduleEntry, ScheduleRun
from stem.beat.specs import next_run
from stem.errors import ConfigurationError, ScheduleConflictError
from stem.log import get_logger
from stem.ports import LockStore, ScheduleStore
from stem.signals import schedule_entry_dispatched, schedule_entry_due, schedule_entry_failed
from stem.task import TaskCall

if TYPE_CHECKING:
    from stem.app import Stem

__all__ = ["CATCH_UP_META", "Beat", "lock_key", "sync_entries"]

log = get_logger(__name__)

#: Entry meta key choosing what happens to missed runs: "once" (default) or "skip".
CATCH_UP_META = "stem.catchUp"
#: Envelope headers every dispatch carries (as the Dart beat writes them).
HEADER_SCHEDULED_FROM = "scheduled-from"
HEADER_SCHEDULE_ID = "schedule-id"
#: Optimistic writes are retried this many times before giving up (Dart's CLI: five).
WRITE_ATTEMPTS = 5
_TASK_IDS = uuid.UUID("6d1c5a38-2c55-4c55-9a0e-6a1f3b1d6b7e")


def lock_key(entry_id: str) -> str:
    """The lock a beat holds while it dispatches ``entry_id``."""
    return f"stem:schedule:{entry_id}"


class Beat:
    """Dispatch the due entries of ``schedules`` through ``app`` until stopped.

    ``locks`` (optional for a single beat) decides which of several beats dispatches an
    entry; ``tick`` is the longest sleep between two looks at the store, ``lock_ttl``
    the lease of an entry's lock (renewed while a dispatch lasts), ``max_interval`` how
    often all entries are re-read. ``concurrency`` bounds the dispatches in flight at
    once. ``misfire_grace`` is how late a run of a ``catch_up="skip"`` entry may be and
    still fire. Entries the app declares (``@app.periodic``, ``app.add_periodic_task``)
    are merged into the store when :meth:`run` starts.
    """

    def __init__(self, app: Stem, *, schedules: ScheduleStore, locks: LockStore | None = None,
                 tick: float = 1.0, lock_ttl: float = 5.0, max_interval: float = 5.0,
                 misfire_grace: float = 5.0, concurrency: int = 64,
                 beat_id: str | None = None) -> None:
        for name, value in (("tick", tick), ("lock_ttl", lock_ttl),
                            ("max_interval", max_interval), ("misfire_grace", misfire_grace)):
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ConfigurationError(f"Beat {name} must be a positive number of seconds, "
                                         f"got {value!r}")
        if concurrency < 1:
            raise ConfigurationError(f"Beat concurrency must be >= 1, got {concurrency!r}")
        self.app = app
        self.schedules = schedules
        self.locks = locks
        self.tick = float(tick)
        self.lock_ttl = float(lock_ttl)
        self.max_interval = float(max_interval)
        self.misfire_grace = float(misfire_grace)
        #: This beat's owner name in the lock store.
        self.id = beat_id or f"beat-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._limit = asyncio.Semaphore(concurrency)
        self._stop = asyncio.Event()
        self._known: dict[str, datetime] = {}  # entry id -> next run, as last seen
        self._next_refresh = 0.0
        self._broken: set[tuple[str, int]] = set()  # (id, version) already reported bad

    def __repr__(self) -> str:
        return f"<Beat {self.id} schedules={self.schedules!r} locks={self.locks!r}>"

    def request_stop(self) -> None:
        """Stop after the dispatches in flight (what SIGTERM/SIGINT do in ``stem beat``)."""
        self._stop.set()

    async def run(self) -> None:
        """Merge the app's declared entries, then dispatch until :meth:`request_stop`."""
        self._stop.clear()
        await sync_entries(self.schedules, self.app.periodic_tasks)
        log.info("beat.started", beat=self.id, declared=len(self.app.periodic_tasks),
                 tick=self.tick, lock_ttl=self.lock_ttl,
                 locks=type(self.locks).__name__ if self.locks else None)
        try:
            while not self._stop.is_set():
                await self.run_once()
                delay = self._sleep_for(utcnow())
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass
        finally:
            log.info("beat.stopped", beat=self.id)

    def _sleep_for(self, now: datetime) -> float:
        delay = min(self.tick, max(0.0, self._next_refresh - time.monotonic()))
        if self._known:
            soonest = min(self._known.values())
            delay = min(delay, (soonest - now).total_seconds())
        return max(delay, 0.0)

    async def run_once(self, now: datetime | None = None) -> int:
        """One pass: re-read the entries if ``max_interval`` passed, then dispatch every
        entry due at ``now`` (default: the current time). Returns how many it dispatched."""
        if time.monotonic() >= self._next_refresh:
            await self.refresh()
        now = now or utcnow()
        done = 0
        seen: set[str] = set()
        batch = 100
        while True:
            due = [e for e in await self.schedules.due(now, batch) if e.id not in seen]
            if not due:
                break
            seen.update(e.id for e in due)
            results = await asyncio.gather(*(self._guarded(e, now) for e in due))
            done += sum(results)
            if len(due) < batch:
                break
        # Entries we knew as due but did not dispatch went to another beat (or are
        # locked): forget their stale time, so the loop does not spin on it.
        for entry_id in [k for k, when in self._known.items() if when <= now]:
            del self._known[entry_id]
        return done

    async def refresh(self) -> None:
        """Re-read every entry: give entries without a next run their first one."""
        self._next_refresh = time.monotonic() + self.max_interval
        now = utcnow()
        known: dict[str, datetime] = {}
        for entry in await self.schedules.entries():
            if not entry.enabled:
                continue
            if entry.next_run_at is None:
                try:
                    first = next_run(entry, now)
                except ConfigurationError as exc:
                    self._report_broken(entry, exc)
                    continue
                if first is None:
                    continue
                try:
                    entry = await self.schedules.upsert(entry.copy(next_run_at=first),
                                                        expected_version=entry.version)
                except ScheduleConflictError:
                    continue  # someone else wrote it: the next refresh sees theirs
            if entry.next_run_at is not None:
                known[entry.id] = entry.next_run_at
        self._known = known

    def _report_broken(self, entry: ScheduleEntry, exc: Exception) -> None:
        if (entry.id, entry.version) not in self._broken:
            self._broken.add((entry.id, entry.version))
            log.error("beat.failed", entry=entry.id, task=entry.task, error=str(exc))
            schedule_entry_failed.send(self, entry=entry, error=exc)

    async def _guarded(self, entry: ScheduleEntry, now: datetime) -> bool:
        async with self._limit:
            try:
                return await self._dispatch(entry, now)
            except Exception as exc:  # a store error on one entry must not stop the beat
                log.error("beat.failed", entry=entry.id, task=entry.task, error=repr(exc))
                schedule_entry_failed.send(self, entry=entry, error=exc)
                return False

    async def _dispatch(self, entry: ScheduleEntry, now: datetime) -> bool:
        key = lock_key(entry.id)
        if self.locks is not None and not await self.locks.acquire(key, self.id, self.lock_ttl):
            log.debug("beat.contended", entry=entry.id, beat=self.id)
            return False
        keeper = asyncio.create_task(self._keep_lock(key)) if self.locks is not None else None
        try:
            return await self._fire(entry, now)
        finally:
            if keeper is not None:
                keeper.cancel()
            if self.locks is not None:
                await self.locks.release(key, self.id)

    async def _keep_lock(self, key: str) -> None:
        assert self.locks is not None
        while True:
            await asyncio.sleep(max(self.lock_ttl / 2, 0.1))
            if not await self.locks.renew(key, self.id, self.lock_ttl):
                log.warning("beat.lock_lost", key=key, beat=self.id)
                return

    async def _fire(self, entry: ScheduleEntry, now: datetime) -> bool:
        assert entry.next_run_at is not None
        planned = entry.next_run_at
        schedule_entry_due.send(self, entry=entry, scheduled_at=planned)
        late = (now - planned).total_seconds()
        log.debug("beat.due", entry=entry.id, task=entry.task, scheduled_at=to_iso(planned),
                  late_ms=round(late * 1000))
        try:
            following = next_run(entry.copy(last_run_at=now), max(now, planned))
        except ConfigurationError as exc:
            # A spec that no longer parses: record the failure and disable the entry,
            # rather than retry it on every tick.
            await self._record(entry, planned, utcnow(), 0, error=str(exc), next_at=None)
            self._report_broken(entry, exc)
            return False
        if entry.meta.get(CATCH_UP_META) == "skip" and late > self.misfire_grace:
            return await self._skip(entry, planned, now)
        jitter = random.randint(0, entry.jitter_ms) if entry.jitter_ms > 0 else 0
        if jitter:
            await asyncio.sleep(jitter / 1000)
        scheduled = planned + timedelta(milliseconds=jitter)
        started = time.monotonic()
        error: str | None = None
        task_id: str | None = None
        try:
            task_id = await self.app.enqueue_call(self._call(entry, planned))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        executed = utcnow()
        try:
            following = next_run(entry.copy(last_run_at=executed), executed)
        except ConfigurationError:
            pass  # checked above; the spec did not change meanwhile
        duration = round((time.monotonic() - started) * 1000)
        stored = await self._record(entry, scheduled, executed, jitter, error=error,
                                    next_at=following, duration_ms=duration)
        drift_ms = round((executed - scheduled).total_seconds() * 1000)
        if error is not None:
            log.error("beat.failed", entry=entry.id, task=entry.task, error=error)
            schedule_entry_failed.send(self, entry=stored or entry, error=error)
            return False
        log.info("beat.dispatched", entry=entry.id, task=entry.task, task_id=task_id,
                 queue=entry.queue, drift_ms=drift_ms, jitter_ms=jitter,
                 next_run_at=to_iso(following) if following else None)
        schedule_entry_dispatched.send(self, entry=stored or entry, task_id=task_id,
                                       scheduled_at=scheduled, executed_at=executed,
                                       drift_ms=drift_ms)
        return True

    async def _record(self, entry: ScheduleEntry, scheduled: datetime, executed: datetime,
                      jitter: int, *, error: str | None, next_at: datetime | None,
                      duration_ms: int = 0) -> ScheduleEntry | None:
        disable = next_at is None or (entry.expire_at is not None
                                      and executed >= entry.expire_at)
        run = ScheduleRun(entry.id, scheduled, executed, error is None, duration_ms, error)
        stored = await self.schedules.mark_run(run, expected_version=entry.version,
                                               next_run_at=next_at, jitter_ms=jitter,
                                               disable=disable)
        if stored is None:
            log.warning("beat.conflict", entry=entry.id, version=entry.version,
                        detail="the entry changed while it was dispatched; run not recorded")
            self._known.pop(entry.id, None)
        elif stored.enabled and stored.next_run_at is not None:
            self._known[entry.id] = stored.next_run_at
        else:
            self._known.pop(entry.id, None)
        return stored

    async def _skip(self, entry: ScheduleEntry, planned: datetime, now: datetime) -> bool:
        following = next_run(entry.copy(last_run_at=now), now)
        try:
            stored = await self.schedules.upsert(
                entry.copy(next_run_at=following, enabled=entry.enabled and following is not None),
                expected_version=entry.version)
        except ScheduleConflictError:
            return False
        log.info("beat.skipped", entry=entry.id, task=entry.task, scheduled_at=to_iso(planned),
                 next_run_at=to_iso(following) if following else None)
        if stored.next_run_at is not None:
            self._known[entry.id] = stored.next_run_at
        return False

    def _call(self, entry: ScheduleEntry, planned: datetime) -> TaskCall[Any]:
        definition = self.app.definition(entry.task, queue=entry.queue)
        meta = {k: v for k, v in entry.meta.items() if k != CATCH_UP_META}
        if entry.kwargs:
            meta["kwargs"] = dict(entry.kwargs)
        # One id per (entry, scheduled time): the producer publishes an id only once, so
        # two beats that both dispatch the same run (a lock lost mid-dispatch) enqueue
        # one task.
        created = to_iso(entry.created_at) if entry.created_at else ""
        task_id = str(uuid.uuid5(_TASK_IDS, f"{entry.id}\x00{created}\x00{to_iso(planned)}"))
        return TaskCall(definition, dict(entry.args)).with_options(
            queue=entry.queue,
            headers={HEADER_SCHEDULED_FROM: "beat", HEADER_SCHEDULE_ID: entry.id},
            meta=meta, task_id=task_id)


async def sync_entries(schedules: ScheduleStore, declared: Sequence[ScheduleEntry],
                       now: datetime | None = None) -> list[ScheduleEntry]:
    """Write code-declared entries into ``schedules``: code is the source of truth for the
    entries it declares (task, spec, args, kwargs, queue, enabled, time zone, jitter,
    expiry and meta are overwritten; run bookkeeping is kept), entries only in the store
    are left alone. A changed spec or time zone gets a new next run. Returns them as
    stored."""
    now = now or utcnow()
    out = []
    for template in declared:
        for attempt in range(WRITE_ATTEMPTS):
            existing = await schedules.get(template.id)
            try:
                out.append(await _merge_one(schedules, template, existing, now))
                break
            except ScheduleConflictError:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
    return out


async def _merge_one(schedules: ScheduleStore, template: ScheduleEntry,
                     existing: ScheduleEntry | None, now: datetime) -> ScheduleEntry:
    if existing is None:
        first = next_run(template.copy(next_run_at=None), now) if template.enabled else None
        return await schedules.upsert(template.copy(next_run_at=first, version=0),
                                      expected_version=0)
    merged = existing.copy(task=template.task, spec=dict(template.spec),
                           args=dict(template.args), kwargs=dict(template.kwargs),
                           queue=template.queue, enabled=template.enabled,
                           timezone=template.timezone, jitter_ms=template.jitter_ms,
                           expire_at=template.expire_at, meta=dict(template.meta))
    rescheduled = (merged.spec != existing.spec or merged.timezone != existing.timezone
                   or (merged.enabled and not existing.enabled)
                   or (merged.enabled and merged.next_run_at is None))
    if rescheduled:
        merged = merged.copy(next_run_at=next_run(merged.copy(next_run_at=None), now)
                             if merged.enabled else None)
    if merged == existing:
        return existing
    return await schedules.upsert(merged, expected_version=existing.version)
