"""The Postgres result backend: one row per task id with an expiry time.

Writes are batched upserts (one statement for any number of statuses); the same
statement NOTIFYs the ids of tasks that reached a terminal state, so ``wait()``
sleeps on LISTEN instead of polling. Expired rows are invisible to reads at once
and deleted in small batches in the background every so many writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from stem._urls import redact
from stem.adapters._shared import check_max_items, meta_appended
from stem.adapters._waiting import ResultWaiters, Watch, wait_for_terminal
from stem.adapters.postgres._pool import Connector, ListenHub, PgSettings, parse_url
from stem.adapters.postgres._sql import Statements
from stem.log import get_logger
from stem.ports import DEFAULT_RESULT_TTL
from stem.status import TaskStatus

log = get_logger(__name__)

#: Longest ``wait()`` sleeps between looks at the row while LISTEN is down.
FALLBACK_POLL = 1.0
#: Rows one purge statement deletes at most (keeps locks and WAL bursts small).
PURGE_BATCH = 1000


def results_channel(settings: PgSettings) -> str:
    """The NOTIFY channel terminal results are announced on, for this schema."""
    return settings.channel("results")


def status_arrays(
    items: Sequence[tuple[TaskStatus, float | None]], default_ttl: float
) -> tuple[list[str], list[str], list[bytes], list[float]]:
    """Parallel arrays (ids, states, JSON bytes, TTLs) for the results upsert.

    The last status of a task id in the batch wins: one INSERT ... ON CONFLICT may not
    update the same row twice.
    """
    latest: dict[str, tuple[TaskStatus, float | None]] = {}
    for status, ttl in items:
        latest[status.id] = (status, ttl)
    return (
        list(latest),
        [s.state.value for s, _ in latest.values()],
        [s.to_json() for s, _ in latest.values()],
        [default_ttl if ttl is None else float(ttl) for _, ttl in latest.values()],
    )


class PostgresResultBackend:
    """:class:`stem.ports.ResultBackend` on a Postgres schema (see the module docstring)."""

    #: Rows written between two background purges of expired rows.
    purge_every: int = 10_000
    #: Seconds between purges when writes are fewer than ``purge_every``.
    purge_interval: float = 300.0

    def __init__(
        self, url: str, *, namespace: str = "stem", default_ttl: float = DEFAULT_RESULT_TTL,
        connector: Connector | None = None, hub: ListenHub | None = None,
    ) -> None:
        self.settings = parse_url(url, namespace)
        self.namespace = namespace
        self.default_ttl = default_ttl
        # A store passes the pool and LISTEN connection its parts share; alone, own them.
        self._owns_db = connector is None
        self._db = Connector(self.settings, "result backend") if connector is None else connector
        self._hub = ListenHub(self._db) if hub is None else hub
        self._sql = Statements(self.settings.quoted_schema)
        self._channel = results_channel(self.settings)
        self._listener = self._hub.channel(self._channel, self._on_notify, self._wake_all)
        self._waiters = ResultWaiters()
        self._written = 0
        self._last_purge = time.monotonic()
        self._purge_task: asyncio.Task[int] | None = None

    async def ping(self) -> None:
        """Connect (migrating on first use) and run a trivial query; fail fast."""
        await self._db.run(lambda c: c.fetchval("SELECT 1"), retry=False)

    async def set_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> None:
        """Upsert statuses in one statement; terminal ones wake their waiters."""
        if not items:
            return
        arrays = status_arrays(items, self.default_ttl)
        await self._db.run(lambda c: c.execute(self._sql.set_results, *arrays, self._channel))
        self._written += len(arrays[0])
        self._maybe_purge()

    async def add_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> set[str]:
        """Insert the statuses whose id has none (or an expired one), in one statement;
        return the ids inserted."""
        if not items:
            return set()
        first: dict[str, tuple[TaskStatus, float | None]] = {}
        for s, t in items:
            first.setdefault(s.id, (s, t))  # a repeated id keeps its first status
        arrays = status_arrays(list(first.values()), self.default_ttl)
        rows = await self._db.run(lambda c: c.fetch(self._sql.add_results, *arrays))
        added = {r[0] for r in rows}
        terminal = [s.id for s, _ in items if s.id in added and s.state.is_terminal]
        if terminal:  # rare (add_many is for queued statuses): wake local waiters
            self._waiters.wake(terminal)
        return added

    async def forget_many(self, task_ids: Sequence[str]) -> None:
        """Delete these statuses."""
        ids = list(dict.fromkeys(task_ids))
        if ids:
            await self._db.run(lambda c: c.execute(self._sql.forget_results, ids))

    async def get(self, task_id: str) -> TaskStatus | None:
        """The stored status, or None when unknown or expired."""
        raw = await self._db.run(lambda c: c.fetchval(self._sql.get_result, task_id))
        return None if raw is None else TaskStatus.from_json(raw)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        """Statuses of the ids that exist and have not expired."""
        if not task_ids:
            return {}
        ids = list(task_ids)
        rows = await self._db.run(lambda c: c.fetch(self._sql.get_results, ids))
        out: dict[str, TaskStatus] = {}
        for r in rows:
            status = TaskStatus.from_json(r[0])
            out[status.id] = status
        return out

    async def append_meta(self, task_id: str, key: str, item: dict[str, Any], *,
                          max_items: int = 100) -> bool:
        """Append ``item`` to ``meta[key]``: ``SELECT ... FOR UPDATE`` and ``UPDATE`` in one
        transaction, so a worker's upsert of the same row waits for it (or it for the
        upsert); the state and expiry columns stay. The JSON is changed here, not as
        ``jsonb``, which would reorder its keys and refuse a ``\\u0000``."""
        check_max_items(max_items)
        sql = self._sql

        async def append(c: Any) -> bool:
            async with c.transaction():
                raw = await c.fetchval(sql.lock_result, task_id)
                if raw is None:
                    return False
                await c.execute(sql.rewrite_result, task_id,
                                meta_appended(raw, key, item, max_items))
                return True

        result: bool = await self._db.run(append)
        return result

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus | None:
        """Wait on LISTEN for ``task_id`` to reach a terminal state (a slow poll while the
        LISTEN connection is down)."""

        async def arm() -> Watch:
            return _ListenWatch(self, task_id)

        return await wait_for_terminal(arm, lambda: self.get(task_id), timeout)

    def _on_notify(self, payload: str) -> None:
        if self._waiters:
            self._waiters.wake(payload.split(","))

    def _wake_all(self) -> None:
        self._waiters.wake(self._waiters.ids())

    def _maybe_purge(self) -> None:
        if self._purge_task is not None and not self._purge_task.done():
            return
        if self._written < self.purge_every and (
            time.monotonic() - self._last_purge < self.purge_interval
        ):
            return
        self._written = 0
        self._last_purge = time.monotonic()
        self._purge_task = asyncio.create_task(self._purge_quietly())

    async def _purge_quietly(self) -> int:
        try:
            return await self.purge_expired()
        except Exception as exc:
            # Housekeeping must never fail a write; the next round tries again.
            log.warning("postgres.purge_failed",
                        error=redact(str(exc) or type(exc).__name__, self.settings.dsn))
            return 0

    async def purge_expired(self, max_batches: int = 10) -> int:
        """Delete expired rows, ``PURGE_BATCH`` per statement; return how many."""
        total = 0
        for _ in range(max_batches):
            status = await self._db.run(lambda c: c.execute(self._sql.purge_expired_results))
            deleted = int(status.rsplit(" ", 1)[-1])
            total += deleted
            if deleted < PURGE_BATCH:
                break
        return total

    async def close(self) -> None:
        """Stop listening, finish housekeeping and close the pool."""
        self._wake_all()
        if self._purge_task is not None:
            await asyncio.gather(self._purge_task, return_exceptions=True)
        await self._listener.close()
        if self._owns_db:
            await self._db.close()


class _ListenWatch:
    """A :class:`~stem.adapters._waiting.Watch` woken by NOTIFY on the results channel."""

    def __init__(self, backend: PostgresResultBackend, task_id: str) -> None:
        self._backend = backend
        self._local = backend._waiters.watch(task_id)

    async def changed(self, seconds: float | None) -> bool:
        if await self._backend._listener.ensure():
            return await self._local.changed(seconds)
        # No LISTEN connection now: poll slowly until it is back.
        step = FALLBACK_POLL if seconds is None else min(FALLBACK_POLL, seconds)
        await self._local.changed(step)
        return True

    async def close(self) -> None:
        await self._local.close()
