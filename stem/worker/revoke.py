"""Revocation in a worker: what it knows of the revoke store, and stopping running tasks.

:class:`Revocations` loads every entry of the app's :class:`~stem.ports.RevokeStore` when
the worker starts (so a revoke issued before it started is honoured), then asks the
store for the entries changed since the highest version it has seen every
:data:`SYNC_INTERVAL` seconds (one cheap query: a ``GET`` on Redis, an index range on
SQL) and re-reads everything every :data:`FULL_SYNC_INTERVAL` (which also catches an
entry written with an older version by a host whose clock is behind). A broadcast may
:meth:`~Revocations.wake` it for an immediate sync.

:class:`RunningTasks` tracks the attempts running now, so a ``terminate`` entry can stop
one: an attempt in the process pool has its child killed (and replaced), an inline
``async def`` one is cancelled, and a thread one gets
:class:`~stem.errors.TaskRevokedError` at its next ``ctx.heartbeat()`` /
``progress()`` / ``extend_lease()`` (a thread cannot be stopped from outside).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from stem._aio import wait_event
from stem._time import utcnow
from stem.envelope import Envelope
from stem.errors import TaskRevokedError
from stem.log import get_logger
from stem.ports import RevokeStore
from stem.revoke import QUEUE_PAUSE_PREFIX, RevokeEntry

log = get_logger(__name__)

#: Seconds between two "changed since" reads of the revoke store.
SYNC_INTERVAL = 0.5
#: Seconds between two full reads (and a prune of entries expired for a while).
FULL_SYNC_INTERVAL = 30.0
#: Expired entries are pruned once they have been expired this long, so every worker
#: has seen the change (a resumed queue is an expired pause entry).
PRUNE_AFTER = 300.0


def revoked_message(entry: RevokeEntry) -> str:
    """The error message of a revoked task's status."""
    return f"Task revoked: {entry.reason}" if entry.reason else "Task revoked"


def revoked_meta(entry: RevokeEntry, revoked_at: str) -> dict[str, Any]:
    """The status meta of a revoked task (the Dart Stem's keys)."""
    return {"revoked": True, "revokedReason": entry.reason, "revokedBy": entry.requested_by,
            "revokedAt": revoked_at, "revokedTerminate": entry.terminate}


class Revocations:
    """A worker's copy of the revoke store's live entries (see the module docstring).

    ``store()`` gives the revoke store (resolved at :meth:`load`; an app without one
    runs without revocation, logged once). ``on_change(entries)`` is called with the
    entries each sync brought that still apply (the worker stops the running ones
    with ``terminate``) and with the queue pause entries that changed.
    """

    def __init__(self, store: Callable[[], RevokeStore], *,
                 on_change: Callable[[list[RevokeEntry]], None],
                 interval: float = SYNC_INTERVAL) -> None:
        self._store_fn = store
        self._store: RevokeStore | None = None
        self._on_change = on_change
        self.interval = interval
        #: Task id -> the entry that applies to it (unexpired).
        self.tasks: dict[str, RevokeEntry] = {}
        #: Queue -> the pause entry that applies to it (unexpired).
        self.paused: dict[str, RevokeEntry] = {}
        self.latest = 0
        self._wake = asyncio.Event()
        self._failing = False
        self._next_full = 0.0

    @property
    def enabled(self) -> bool:
        """True when a revoke store was found."""
        return self._store is not None

    def get(self, task_id: str) -> RevokeEntry | None:
        """The entry revoking ``task_id`` now, if any."""
        entry = self.tasks.get(task_id)
        if entry is None:
            return None
        if entry.is_expired():
            del self.tasks[task_id]
            return None
        return entry

    def wake(self) -> None:
        """Sync now (a broadcast said something changed)."""
        self._wake.set()

    def apply(self, entries: Iterable[RevokeEntry]) -> None:
        """Apply entries now (a broadcast brought them; the store has them already)."""
        self._apply(entries, notify=True)

    def _apply(self, entries: Iterable[RevokeEntry], *, notify: bool) -> None:
        now = utcnow()
        fresh: list[RevokeEntry] = []
        for e in entries:
            self.latest = max(self.latest, e.version)
            if e.is_queue_pause:
                queue = e.task_id[len(QUEUE_PAUSE_PREFIX):]
                cur = self.paused.get(queue)
                if cur is not None and cur.version >= e.version:
                    continue
                if e.is_expired(now):
                    if self.paused.pop(queue, None) is not None:
                        fresh.append(e)
                else:
                    self.paused[queue] = e
                    fresh.append(e)
                continue
            cur = self.tasks.get(e.task_id)
            if cur is not None and cur.version >= e.version:
                continue
            if e.is_expired(now):
                self.tasks.pop(e.task_id, None)
                continue
            self.tasks[e.task_id] = e
            fresh.append(e)
        if fresh and notify:
            self._on_change(fresh)

    async def load(self) -> None:
        """Read every entry (at the worker's start). Never raises: a store that is down
        is logged, and the sync loop keeps trying."""
        try:
            self._store = self._store_fn()
        except Exception as exc:
            log.warning("worker.revocation_disabled", error=str(exc))
            return
        try:
            self._apply(await self._store.entries(), notify=True)
            self._next_full = time.monotonic() + FULL_SYNC_INTERVAL
        except Exception as exc:
            log.error("worker.revoke_sync_failed", error=repr(exc))
            self._failing = True

    async def sync(self) -> None:
        """One sync: the entries changed since the latest seen (or all, now and then)."""
        store = self._store
        if store is None:
            return
        full = time.monotonic() >= self._next_full
        if full:
            entries = await store.entries()
            self._next_full = time.monotonic() + FULL_SYNC_INTERVAL
            try:
                await store.prune_expired(utcnow() - timedelta(seconds=PRUNE_AFTER))
            except Exception as exc:
                log.warning("worker.revoke_prune_failed", error=repr(exc))
        else:
            entries = await store.changed_since(self.latest)
        self._apply(entries, notify=True)

    async def run(self) -> None:
        """Sync every ``interval`` seconds (sooner when woken) until cancelled."""
        if self._store is None:
            return
        while True:
            await wait_event(self._wake, self.interval)
            self._wake.clear()
            try:
                await self.sync()
            except Exception as exc:
                if not self._failing:
                    log.error("worker.revoke_sync_failed", error=repr(exc))
                    self._failing = True
                continue
            if self._failing:
                log.info("worker.revoke_sync_recovered")
                self._failing = False


@dataclass(slots=True, eq=False)
class Running:
    """One attempt running now."""

    envelope: Envelope
    is_async: bool
    task: asyncio.Task[Any] | None
    started: float = field(default_factory=time.time)
    #: Set when a ``terminate`` revoke reached it.
    revoked: RevokeEntry | None = None


class RunningTasks:
    """The attempts running in a worker, by task id (for terminate, stats, inspect)."""

    def __init__(self) -> None:
        self.by_id: dict[str, Running] = {}

    def start(self, env: Envelope, is_async: bool,
              loop: asyncio.AbstractEventLoop | None = None) -> Running:
        """Record the attempt of ``env`` running in the current task (of ``loop``, when
        given: saves looking the running loop up, a getpid() call on Python 3.11)."""
        run = Running(env, is_async, asyncio.current_task(loop))
        self.by_id[env.id] = run
        return run

    def end(self, run: Running) -> None:
        if self.by_id.get(run.envelope.id) is run:
            del self.by_id[run.envelope.id]

    def revoked(self, task_id: str) -> RevokeEntry | None:
        """The terminate entry that reached ``task_id``'s running attempt (any thread)."""
        run = self.by_id.get(task_id)
        return None if run is None else run.revoked

    def terminate(self, entry: RevokeEntry, pool: Any) -> bool:
        """Stop the running attempt of ``entry.task_id`` (see the module docstring);
        False when none runs here."""
        run = self.by_id.get(entry.task_id)
        if run is None or run.revoked is not None:
            return False
        run.revoked = entry
        log.warning("task.terminating", task_id=entry.task_id, task=run.envelope.name,
                    reason=entry.reason)
        if pool is not None and pool.terminate(entry.task_id,
                                               TaskRevokedError(revoked_message(entry))):
            return True
        if run.is_async and run.task is not None:
            run.task.cancel()
        return True  # a thread: TaskRevokedError at its next heartbeat

    @staticmethod
    def revoked_by(run: Running, exc: BaseException) -> RevokeEntry | None:
        """The entry when ``exc`` is how a terminate revoke ended ``run``, else None.
        Takes the cancellation back (``uncancel``) when it was ours."""
        if run.revoked is None:
            return None
        if isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return run.revoked
        return run.revoked if isinstance(exc, TaskRevokedError) else None
