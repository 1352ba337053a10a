"""The beat: dispatches due schedule entries as tasks (``stem beat``).

One loop per process: ask the schedule store for the entries due now (one read),
enqueue them together (one ``enqueue_many``), record their runs with their next run
times (one version-guarded ``mark_runs`` call for the batch), and sleep until the
soonest known next run (at most ``tick`` seconds).

Several beats may share one schedule store and one lock store: the one that holds the
lease ``stem:beat`` in the lock store (the **leader**, lease ``lock_ttl``, renewed every
third of it) dispatches; the others retry the lease every ``tick`` and take over once
a dead leader's lease runs out. A leader that stops releases it. Should two beats ever
dispatch at once (a lease lost during a long pause), each scheduled run still becomes
one task (its task id is derived from the entry and the scheduled time, and the
producer publishes an id once) and one history record (``mark_run`` checks the version
the beat read).
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
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from stem import metrics
from stem._aio import cancel_and_wait, wait_event
from stem._time import to_iso, utcnow
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.beat.specs import next_run
from stem.errors import ConfigurationError, ScheduleConflictError
from stem.log import get_logger
from stem.ports import LockStore, ScheduleStore
from stem.signals import schedule_entry_dispatched, schedule_entry_due, schedule_entry_failed
from stem.task import TaskCall

if TYPE_CHECKING:
    from stem.app import Stem

__all__ = ["CATCH_UP_META", "LEADER_KEY", "Beat", "sync_entries"]

log = get_logger(__name__)

#: Entry meta key choosing what happens to missed runs: "once" (default) or "skip".
CATCH_UP_META = "stem.catchUp"
#: Envelope headers every dispatch carries (as the Dart beat writes them).
HEADER_SCHEDULED_FROM = "scheduled-from"
HEADER_SCHEDULE_ID = "schedule-id"
#: Optimistic writes are retried this many times before giving up (Dart's CLI: five).
WRITE_ATTEMPTS = 5
#: The lease in the lock store that makes a beat the one that dispatches.
LEADER_KEY = "stem:beat"
#: Most entries read (and enqueued together) per ``due`` call.
DUE_BATCH = 1000
#: How far ahead (seconds) the running beat reads and prepares the entries coming due,
#: so that at their time only the enqueue is left to do.
LOOKAHEAD = 0.5
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TASK_IDS = uuid.UUID("6d1c5a38-2c55-4c55-9a0e-6a1f3b1d6b7e")


class Beat:
    """Dispatch the due entries of ``schedules`` through ``app`` until stopped.

    ``locks`` (optional for a single beat) decides which of several beats dispatches:
    the holder of the :data:`LEADER_KEY` lease. ``tick`` is the longest sleep between
    two looks at the store (and how often a follower tries the lease), ``lock_ttl`` the
    lease (renewed every third of it; a dead leader is replaced after at most
    ``lock_ttl + tick``), ``max_interval`` how often all entries are re-read.
    ``concurrency`` bounds the store writes in flight at once. ``misfire_grace`` is how
    late a run of a ``catch_up="skip"`` entry may be and still fire. ``lookahead`` is
    how long before entries come due :meth:`run` reads them and builds their tasks
    (then waits for their time and enqueues them together). Entries the app declares
    (``@app.periodic``, ``app.add_periodic_task``) are merged into the store when
    :meth:`run` starts.
    """

    def __init__(self, app: Stem, *, schedules: ScheduleStore, locks: LockStore | None = None,
                 tick: float = 1.0, lock_ttl: float = 5.0, max_interval: float = 5.0,
                 misfire_grace: float = 5.0, concurrency: int = 64,
                 lookahead: float = LOOKAHEAD, beat_id: str | None = None) -> None:
        for name, value in (("tick", tick), ("lock_ttl", lock_ttl),
                            ("max_interval", max_interval), ("misfire_grace", misfire_grace)):
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ConfigurationError(f"Beat {name} must be a positive number of seconds, "
                                         f"got {value!r}")
        if concurrency < 1:
            raise ConfigurationError(f"Beat concurrency must be >= 1, got {concurrency!r}")
        if not isinstance(lookahead, int | float) or not 0 <= lookahead <= 60:
            raise ConfigurationError(f"Beat lookahead must be 0 to 60 seconds, got {lookahead!r}")
        self.app = app
        self.schedules = schedules
        self.locks = locks
        self.tick = float(tick)
        self.lock_ttl = float(lock_ttl)
        self.max_interval = float(max_interval)
        self.misfire_grace = float(misfire_grace)
        self.lookahead = float(lookahead)
        #: This beat's owner name in the lock store.
        self.id = beat_id or f"beat-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._limit = asyncio.Semaphore(concurrency)
        self._stop = asyncio.Event()
        self._known: dict[str, datetime] = {}  # entry id -> next run, as last seen
        self._next_refresh = 0.0
        self._broken: set[tuple[str, int]] = set()  # (id, version) already reported bad
        self._wake = asyncio.Event()  # stop requested, or runs recorded (new next times)
        self._in_flight: set[str] = set()  # enqueued entries whose runs are being recorded
        self._recording: set[asyncio.Task[None]] = set()
        self._lease_until = 0.0  # monotonic end of our leader lease (0: not the leader)
        self._lease_renew_at = 0.0

    def __repr__(self) -> str:
        return f"<Beat {self.id} schedules={self.schedules!r} locks={self.locks!r}>"

    @property
    def is_leader(self) -> bool:
        """True while this beat holds the leader lease (always, without a lock store)."""
        return self.locks is None or time.monotonic() < self._lease_until

    def request_stop(self) -> None:
        """Stop after the dispatches in flight (what SIGTERM/SIGINT do in ``stem beat``)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Merge the app's declared entries, then dispatch until :meth:`request_stop`."""
        self._stop.clear()
        await sync_entries(self.schedules, self.app.periodic_tasks)
        try:  # connect the publish path now, not at the first due time
            await self.app.broker.ping()
        except Exception as exc:  # the first dispatch reports it per entry
            log.warning("beat.broker_unavailable", beat=self.id, error=repr(exc))
        log.info("beat.started", beat=self.id, declared=len(self.app.periodic_tasks),
                 tick=self.tick, lock_ttl=self.lock_ttl,
                 locks=type(self.locks).__name__ if self.locks else None)
        keeper = asyncio.create_task(self._keep_lease()) if self.locks is not None else None
        try:
            while not self._stop.is_set():
                if self.locks is not None and not self.is_leader:
                    await self._acquire_lease()
                if self.is_leader:
                    # Runs are recorded in the background: the next look ahead need not
                    # wait for the bookkeeping of this one.
                    await self.run_once(lookahead=self.lookahead, wait=False, refresh=False)
                    # Re-read every entry when nothing is about to come due, so the
                    # full read never delays a dispatch (unless one is overdue by a
                    # whole max_interval).
                    overdue = time.monotonic() - self._next_refresh
                    if overdue >= 0 and (self._sleep_for(utcnow()) > 0.25
                                         or overdue >= self.max_interval):
                        await self.refresh()
                    self._wake.clear()
                    delay = self._sleep_for(utcnow())
                else:
                    self._wake.clear()
                    delay = self.tick
                if delay > 0 and not self._stop.is_set():
                    await wait_event(self._wake, delay)
        finally:
            await self._drain()
            await cancel_and_wait(keeper)  # before the release, so it cannot re-take the lease
            await self._release_lease()
            log.info("beat.stopped", beat=self.id)

    # -- the leader lease -----------------------------------------------------------

    async def _acquire_lease(self) -> bool:
        """Take or extend the leader lease (one lock-store call)."""
        assert self.locks is not None
        was_leader = self.is_leader
        started = time.monotonic()
        try:
            held = await self.locks.acquire(LEADER_KEY, self.id, self.lock_ttl)
        except Exception as exc:  # a lock-store outage: not the leader until it answers
            log.error("beat.lock_failed", beat=self.id, error=repr(exc))
            held = False
        if held:
            self._lease_until = started + self.lock_ttl
            self._lease_renew_at = started + self.lock_ttl / 3
            if not was_leader:
                log.info("beat.leader", beat=self.id)
        else:
            if was_leader:
                log.warning("beat.lock_lost", key=LEADER_KEY, beat=self.id)
            self._lease_until = 0.0
        return held

    async def _keep_lease(self) -> None:
        """Renew the lease every third of its length while leader (a dispatch in flight
        does not delay it)."""
        while True:
            await asyncio.sleep(max(self._lease_renew_at - time.monotonic(), 0.01)
                                if self.is_leader else self.tick)
            if self.is_leader and time.monotonic() >= self._lease_renew_at:
                await self._acquire_lease()

    async def _release_lease(self) -> None:
        if self.locks is None or not self.is_leader:
            return
        self._lease_until = 0.0
        try:
            await self.locks.release(LEADER_KEY, self.id)
        except Exception as exc:  # it expires anyway
            log.warning("beat.lock_failed", beat=self.id, error=repr(exc))

    # -- one pass -------------------------------------------------------------------

    def _sleep_for(self, now: datetime) -> float:
        delay = self.tick
        if self._known:
            soonest = min(self._known.values())
            delay = min(delay, (soonest - now).total_seconds() - self.lookahead)
        return max(delay, 0.0)

    async def run_once(self, now: datetime | None = None, *, lookahead: float = 0.0,
                       wait: bool = True, refresh: bool = True) -> int:
        """One pass: re-read the entries if ``max_interval`` passed, then dispatch every
        entry due at ``now`` (default: the current time). Returns how many it dispatched.
        With ``lookahead``, entries due up to that many seconds after ``now`` are read
        too, and each is enqueued at its time. With ``wait=False`` it returns once the
        tasks are enqueued, while their runs are still being recorded.

        With a lock store, only the leader dispatches: a beat that cannot take the
        lease dispatches nothing (0)."""
        if self.locks is not None and not self.is_leader and not await self._acquire_lease():
            log.debug("beat.contended", beat=self.id)
            return 0
        if refresh and time.monotonic() >= self._next_refresh:
            await self.refresh()
        now = now or utcnow()
        horizon = now + timedelta(seconds=lookahead)
        done = 0
        seen: set[str] = set()
        while self.is_leader:
            # Entries being recorded when the read starts may come back as they were
            # before their record: skip them (taken before the read, not after).
            recording = set(self._in_flight)
            found = await self.schedules.due(horizon, DUE_BATCH)
            due = [e for e in found if e.id not in seen and e.id not in recording]
            if not due:
                break
            seen.update(e.id for e in due)
            done += await self._dispatch_batch(due, now)
            if len(found) < DUE_BATCH:
                break
        # Entries we knew as due but did not dispatch went elsewhere: forget their stale
        # time, so the loop does not spin on it.
        for entry_id in [k for k, when in self._known.items() if when <= now]:
            del self._known[entry_id]
        if wait:
            await self._drain()
        return done

    async def _drain(self) -> None:
        """Wait until every run enqueued so far is recorded."""
        while self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)

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

    async def _guarded(self, entry: ScheduleEntry, step: Awaitable[bool]) -> bool:
        async with self._limit:
            try:
                return await step
            except Exception as exc:  # a store error on one entry must not stop the beat
                log.error("beat.failed", entry=entry.id, task=entry.task, error=repr(exc))
                schedule_entry_failed.send(self, entry=entry, error=exc)
                return False

    async def _dispatch_batch(self, due: list[ScheduleEntry], now: datetime) -> int:
        """Dispatch ``due``: entries without jitter, skips or broken specs are enqueued
        together (one ``enqueue_many``) and recorded concurrently; the others one by one."""
        plain: list[tuple[ScheduleEntry, TaskCall[Any]]] = []
        single: list[Awaitable[bool]] = []
        metrics.recorder.schedule_due(len(due))
        for entry in due:
            assert entry.next_run_at is not None
            planned = entry.next_run_at
            schedule_entry_due.send(self, entry=entry, scheduled_at=planned)
            late = (now - planned).total_seconds()
            try:
                next_run(entry.copy(last_run_at=now), max(now, planned))
            except ConfigurationError as exc:
                single.append(self._guarded(entry, self._broken_spec(entry, planned, exc)))
                continue
            if entry.meta.get(CATCH_UP_META) == "skip" and late > self.misfire_grace:
                single.append(self._guarded(entry, self._skip(entry, planned, now)))
            elif entry.jitter_ms > 0:
                single.append(self._guarded(entry, self._fire_one(entry)))
            else:
                try:
                    plain.append((entry, self._call(entry, planned)))
                except Exception as exc:  # a task the app cannot build: this entry only
                    single.append(self._guarded(entry, self._fire_one(entry, error=exc)))
        results = await asyncio.gather(self._fire_at_their_time(plain), *single)
        return sum(results)

    async def _fire_at_their_time(self, plain: list[tuple[ScheduleEntry, TaskCall[Any]]]
                                  ) -> int:
        """Enqueue prepared entries when they come due: all those due together in one
        ``enqueue_many``."""
        plain.sort(key=lambda item: item[0].next_run_at or _EPOCH)
        done = 0
        while plain and not self._stop.is_set():
            wait = ((plain[0][0].next_run_at or _EPOCH) - utcnow()).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            cutoff = utcnow()
            n = next((i for i, (e, _) in enumerate(plain)
                      if e.next_run_at is not None and e.next_run_at > cutoff), len(plain))
            batch, plain = plain[:n], plain[n:]
            done += await self._fire_many(batch)
        return done

    async def _fire_many(self, plain: list[tuple[ScheduleEntry, TaskCall[Any]]]) -> int:
        if not plain:
            return 0
        started = time.monotonic()
        errors: list[str | None] = [None] * len(plain)
        try:
            ids: list[str | None] = list(await self.app.enqueue_many([c for _, c in plain]))
        except Exception:
            # One bad entry must not fail the others: enqueue them one by one instead
            # (the ids that did get published are not published twice).
            outcome = await asyncio.gather(*(self.app.enqueue_call(c) for _, c in plain),
                                           return_exceptions=True)
            ids = [None if isinstance(o, BaseException) else o for o in outcome]
            errors = [f"{type(o).__name__}: {o}" if isinstance(o, BaseException) else None
                      for o in outcome]
        executed = utcnow()
        duration = round((time.monotonic() - started) * 1000)
        dispatched = [(entry, task_id, error)
                      for (entry, _), task_id, error in zip(plain, ids, errors, strict=True)]
        entry_ids = [entry.id for entry, _ in plain]
        self._in_flight.update(entry_ids)
        for entry_id in entry_ids:
            self._known.pop(entry_id, None)

        async def record() -> None:
            try:
                await self._record_many(dispatched, executed, duration)
            finally:
                self._in_flight.difference_update(entry_ids)
                self._wake.set()

        task = asyncio.create_task(record())
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        return sum(error is None for error in errors)

    async def _fire_one(self, entry: ScheduleEntry, error: Exception | None = None) -> bool:
        assert entry.next_run_at is not None
        planned = entry.next_run_at
        jitter = random.randint(0, entry.jitter_ms) if entry.jitter_ms > 0 else 0
        wait = (planned - utcnow()).total_seconds() + jitter / 1000
        if wait > 0:
            await asyncio.sleep(wait)
        scheduled = planned + timedelta(milliseconds=jitter)
        started = time.monotonic()
        message: str | None = None
        task_id: str | None = None
        try:
            if error is not None:
                raise error
            task_id = await self.app.enqueue_call(self._call(entry, planned))
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
        executed = utcnow()
        duration = round((time.monotonic() - started) * 1000)
        return await self._after(entry, scheduled, jitter, executed, duration, task_id, message)

    async def _record_many(self, dispatched: list[tuple[ScheduleEntry, str | None, str | None]],
                           executed: datetime, duration: int) -> None:
        """Record the runs of entries enqueued together (one ``mark_runs`` call), then log
        and signal each."""
        marks: list[MarkRun] = []
        followings: list[datetime | None] = []
        for entry, _, error in dispatched:
            following = self._following(entry, executed)
            followings.append(following)
            marks.append(self._mark(entry, entry.next_run_at or executed, executed, 0,
                                    error=error, next_at=following, duration_ms=duration))
        async with self._limit:
            try:
                stored = await self.schedules.mark_runs(marks)
            except Exception as exc:  # a store error must not stop the beat
                for entry, _, _ in dispatched:
                    log.error("beat.failed", entry=entry.id, task=entry.task, error=repr(exc))
                    schedule_entry_failed.send(self, entry=entry, error=exc)
                return
        for (entry, task_id, error), mark, following, after in zip(
                dispatched, marks, followings, stored, strict=True):
            self._recorded(entry, after)
            self._report(entry, after, mark.run.scheduled_at, 0, executed, task_id, error,
                         following)

    @staticmethod
    def _following(entry: ScheduleEntry, executed: datetime) -> datetime | None:
        """The next run after a dispatch at ``executed`` (None: none, or a bad spec)."""
        try:
            return next_run(entry.copy(last_run_at=executed), executed)
        except ConfigurationError:
            return None

    async def _after(self, entry: ScheduleEntry, scheduled: datetime, jitter: int,
                     executed: datetime, duration: int, task_id: str | None,
                     error: str | None) -> bool:
        """Record a dispatch (or its failure), then log and signal it."""
        following = self._following(entry, executed)
        stored = await self._record(entry, scheduled, executed, jitter, error=error,
                                    next_at=following, duration_ms=duration)
        return self._report(entry, stored, scheduled, jitter, executed, task_id, error,
                            following)

    def _report(self, entry: ScheduleEntry, stored: ScheduleEntry | None, scheduled: datetime,
                jitter: int, executed: datetime, task_id: str | None, error: str | None,
                following: datetime | None) -> bool:
        """Log and signal a recorded dispatch; True if it was enqueued."""
        drift_ms = round((executed - scheduled).total_seconds() * 1000)
        if error is not None:
            log.error("beat.failed", entry=entry.id, task=entry.task, error=error)
            schedule_entry_failed.send(self, entry=stored or entry, error=error)
            metrics.recorder.schedule_failed()
            return False
        log.info("beat.dispatched", entry=entry.id, task=entry.task, task_id=task_id,
                 queue=entry.queue, drift_ms=drift_ms, jitter_ms=jitter,
                 next_run_at=to_iso(following) if following else None)
        metrics.recorder.schedule_dispatched(drift_ms / 1000)
        schedule_entry_dispatched.send(self, entry=stored or entry, task_id=task_id,
                                       scheduled_at=scheduled, executed_at=executed,
                                       drift_ms=drift_ms)
        return True

    async def _broken_spec(self, entry: ScheduleEntry, planned: datetime,
                           exc: ConfigurationError) -> bool:
        # A spec that no longer parses: record the failure and disable the entry, rather
        # than retry it on every tick.
        await self._record(entry, planned, utcnow(), 0, error=str(exc), next_at=None)
        self._report_broken(entry, exc)
        return False

    @staticmethod
    def _mark(entry: ScheduleEntry, scheduled: datetime, executed: datetime, jitter: int, *,
              error: str | None, next_at: datetime | None, duration_ms: int = 0) -> MarkRun:
        """What recording this dispatch writes (disabled when it has no next run or
        expired)."""
        disable = next_at is None or (entry.expire_at is not None
                                      and executed >= entry.expire_at)
        run = ScheduleRun(entry.id, scheduled, executed, error is None, duration_ms, error)
        return MarkRun(run, entry.version, next_at, jitter, disable)

    def _recorded(self, entry: ScheduleEntry, stored: ScheduleEntry | None) -> None:
        """Note the entry's next run as recorded (or forget it after a conflict)."""
        if stored is None:
            log.warning("beat.conflict", entry=entry.id, version=entry.version,
                        detail="the entry changed while it was dispatched; run not recorded")
            self._known.pop(entry.id, None)
        elif stored.enabled and stored.next_run_at is not None:
            self._known[entry.id] = stored.next_run_at
        else:
            self._known.pop(entry.id, None)

    async def _record(self, entry: ScheduleEntry, scheduled: datetime, executed: datetime,
                      jitter: int, *, error: str | None, next_at: datetime | None,
                      duration_ms: int = 0) -> ScheduleEntry | None:
        mark = self._mark(entry, scheduled, executed, jitter, error=error, next_at=next_at,
                          duration_ms=duration_ms)
        stored = await self.schedules.mark_run(mark.run, expected_version=mark.expected_version,
                                               next_run_at=mark.next_run_at,
                                               jitter_ms=mark.jitter_ms, disable=mark.disable)
        self._recorded(entry, stored)
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
