"""SQLite broker: one jobs table leased with ``BEGIN IMMEDIATE``, shared by processes.

Lease semantics: a fetch claims rows by writing a fresh random lease token, the
consumer name and ``locked_until`` in one write transaction; the delivery's ``lease``
is ``SqliteLease(row id, token)`` and its ``receipt`` ``"<row id>:<token>"``. ``ack``, ``nack``, ``retry``, ``dead_letter``
and ``extend_lease`` only touch a row whose token still matches. An expired lease
makes the row fetchable again; once another consumer has fetched it the token
changed, so the first consumer's late ack/nack/retry/dead-letter/extend does nothing
(it cannot remove or move work another worker now owns). A lease that expired but
was not re-leased yet is still honoured.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from stem._time import now_epoch
from stem.adapters._leasing import NOTHING, Claim, LeasingBroker, delivery
from stem.adapters._shared import (
    DEAD_LETTER_SWEEP_INTERVAL,
    DEFAULT_DEAD_LETTER_RETENTION,
    Waiter,
    check_publishable,
    decode_stored,
    lease_seconds,
    replayed,
)
from stem.envelope import Envelope, peek_task_id
from stem.limits import MAX_VISIBILITY_TIMEOUT, MIN_VISIBILITY_TIMEOUT, clamp_priority
from stem.ports import DEFAULT_VISIBILITY_TIMEOUT, DeadLetter, Delivery, QueueStats

from ._db import (
    FETCH_POLL_INTERVAL,
    Database,
    Hub,
    chunks,
    ensure_schema,
    hub_for,
    immediate,
    placeholders,
    quote,
    table_prefix,
)

SCHEMA_VERSION = 1

# (queue, priority, not_before or None, task id, visibility timeout, raw)
_NewJob = tuple[str, int, float | None, str | None, float | None, bytes]
# (row id, priority, not_before, raw, locked_until, deliveries) as claimed
_Claimed = tuple[int, int, float, bytes, float, int]
# (lease token, [(queue, claimed row)])
_ClaimResult = tuple[str, list[tuple[str, _Claimed]]]
_Sql = Callable[[sqlite3.Connection], None]


class SqliteLease(NamedTuple):
    """A SQLite delivery's lease: its row and the token the fetch wrote into it."""

    row_id: int
    token: str


def leases_of(deliveries: Sequence[Delivery]) -> list[SqliteLease]:
    """The leases of the deliveries a SQLite broker fetched."""
    return [d.lease for d in deliveries if isinstance(d.lease, SqliteLease)]


def _job(env: Envelope, queue: str | None = None) -> _NewJob:
    return (
        queue or env.queue,
        clamp_priority(env.priority),
        env.not_before_epoch,
        env.id,
        lease_seconds(env.visibility_timeout),
        env.to_json(),
    )


def _claim_order(row: _Claimed) -> tuple[float, float, int]:
    """Sort key of a claimed row (priority first, then age), whatever its columns hold.

    Columns written by other programs may hold text; sorting must not fail on them.
    """
    _id, priority, not_before = row[0], row[1], row[2]
    p = priority if isinstance(priority, int | float) else 0
    nb = not_before if isinstance(not_before, int | float) else 0.0
    return (-p, nb, _id)


class _Wakeup:
    """A fetch's wake-up: the hub's publish signal (same process), else a short poll."""

    __slots__ = ("_hub", "_waiter")

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._waiter: Waiter | None = None

    def arm(self) -> None:
        self.close()
        self._waiter = self._hub.watch_queues()

    async def wait(self, seconds: float) -> bool:
        # Another process may have published: never sleep longer than one poll.
        return self._waiter is not None and await self._waiter.wait(
            min(FETCH_POLL_INTERVAL, seconds))

    def close(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._hub.unwatch_queues(waiter)


_DeadRow = tuple[int, str | None, bytes, str, float]


def _since(since: float | None) -> float:
    return float("-inf") if since is None else since


def _row_id(dead_letter_id: str) -> int:
    """The row id in an id made up for an undecodable dead letter (``dl-<row>``), or -1."""
    tail = dead_letter_id.removeprefix("dl-")
    return int(tail) if tail != dead_letter_id and tail.isdigit() else -1


def _letter(queue: str, row: _DeadRow) -> DeadLetter:
    row_id, task_id, raw, reason, dead_at = row
    env, _ = decode_stored(raw)
    return DeadLetter(
        id=env.id if env is not None else task_id or f"dl-{row_id}",
        queue=queue,
        raw=raw,
        reason=reason,
        dead_at=dead_at,
        envelope=env,
    )


class SqliteBroker(LeasingBroker):
    """A :class:`stem.ports.Broker` on a SQLite file that several processes share.

    All SQL runs on the adapter's own thread (see :class:`Database`). Idle blocking
    fetches poll every ``FETCH_POLL_INTERVAL`` seconds with a read-only query and are
    woken at once by a publish from the same process.
    """

    kind = "sqlite"
    lease_type = SqliteLease

    def __init__(
        self,
        path: str,
        *,
        namespace: str = "stem",
        visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        db: Database | None = None,
        dead_letter_retention: float = DEFAULT_DEAD_LETTER_RETENTION,
    ) -> None:
        super().__init__()
        self.path = path
        self.default_visibility_timeout = visibility_timeout
        #: Dead letters older than this many seconds are deleted (see sweep_dead_letters).
        self.dead_letter_retention = dead_letter_retention
        self._last_sweep = float("-inf")
        prefix = table_prefix(namespace)
        self._prefix = prefix
        self._jobs = quote(f"{prefix}_jobs")
        self._dead = quote(f"{prefix}_dead_letters")
        # A store passes the database its parts share (one connection); alone, own one.
        self._owns_db = db is None
        self._db = Database(path) if db is None else db
        self._db.add_setup(self._create)
        self._hub = hub_for(path, prefix)

    def __repr__(self) -> str:
        return f"SqliteBroker({self.path!r})"

    def _create(self, conn: sqlite3.Connection) -> None:
        j, d, p = self._jobs, self._dead, self._prefix
        ensure_schema(
            conn,
            f"{p}_jobs",
            SCHEMA_VERSION,
            [
                # AUTOINCREMENT: row ids are never reused, so an old receipt can't
                # name a newer job.
                f"""CREATE TABLE IF NOT EXISTS {j} (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    queue TEXT NOT NULL,
                    priority INTEGER NOT NULL DEFAULT 0,
                    not_before REAL NOT NULL,
                    task_id TEXT,
                    vt REAL,
                    raw BLOB NOT NULL,
                    lease_owner TEXT,
                    lease_token TEXT,
                    locked_until REAL,
                    deliveries INTEGER NOT NULL DEFAULT 0
                )""",
                f"CREATE INDEX IF NOT EXISTS {quote(p + '_jobs_ready')} ON {j} "
                "(queue, priority DESC, not_before, id)",
                f"""CREATE TABLE IF NOT EXISTS {d} (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    queue TEXT NOT NULL,
                    task_id TEXT,
                    priority INTEGER NOT NULL DEFAULT 0,
                    raw BLOB NOT NULL,
                    reason TEXT NOT NULL,
                    dead_at REAL NOT NULL
                )""",
                f"CREATE INDEX IF NOT EXISTS {quote(p + '_dead_letters_queue')} ON {d} (queue, id)",
            ],
        )

    # -- SQL run on the database thread ------------------------------------------

    def _insert(self, conn: sqlite3.Connection, jobs: Sequence[_NewJob], now: float) -> None:
        conn.executemany(
            f"INSERT INTO {self._jobs} (queue, priority, not_before, task_id, vt, raw) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(q, p, now if nb is None else nb, t, vt, raw) for q, p, nb, t, vt, raw in jobs],
        )

    def _claim_sql(
        self, order: Sequence[str], max_count: int, consumer: str, precheck: bool
    ) -> Callable[[sqlite3.Connection], _ClaimResult]:
        jobs = self._jobs

        def claim(conn: sqlite3.Connection) -> _ClaimResult:
            now = now_epoch()
            token = secrets.token_hex(8)
            if precheck:
                # A read needs no write lock, so idle pollers don't queue up behind
                # each other or behind producers.
                ready = conn.execute(
                    f"SELECT 1 FROM {jobs} WHERE queue IN ({placeholders(len(order))}) "
                    "AND not_before <= ? AND (locked_until IS NULL OR locked_until <= ?) LIMIT 1",
                    (*order, now, now),
                ).fetchone()
                if ready is None:
                    return token, []
            claimed: list[tuple[str, _Claimed]] = []
            with immediate(conn):
                for queue in order:
                    need = max_count - len(claimed)
                    if need <= 0:
                        break
                    # The lease length is clamped here too, so no stored vt (huge,
                    # negative, text written by another program) gives an unbounded lease.
                    rows: list[_Claimed] = conn.execute(
                        f"UPDATE {jobs} SET lease_owner = ?, lease_token = ?, "
                        f"locked_until = ? + MIN(MAX(COALESCE(vt, ?), {MIN_VISIBILITY_TIMEOUT!r}), "
                        f"{MAX_VISIBILITY_TIMEOUT!r}), deliveries = deliveries + 1 "
                        f"WHERE id IN (SELECT id FROM {jobs} WHERE queue = ? AND not_before <= ? "
                        "AND (locked_until IS NULL OR locked_until <= ?) "
                        "ORDER BY priority DESC, not_before, id LIMIT ?) "
                        "RETURNING id, priority, not_before, raw, locked_until, deliveries",
                        (
                            consumer,
                            token,
                            now,
                            self.default_visibility_timeout,
                            queue,
                            now,
                            now,
                            need,
                        ),
                    ).fetchall()
                    # RETURNING gives no order guarantee.
                    rows.sort(key=_claim_order)
                    claimed.extend((queue, r) for r in rows)
            return token, claimed

        return claim

    def _unlease(self, leases: Sequence[SqliteLease]) -> _Sql:
        jobs = self._jobs

        def unlease(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany(
                    f"UPDATE {jobs} SET lease_owner = NULL, lease_token = NULL, "
                    "locked_until = NULL WHERE id = ? AND lease_token = ?",
                    leases,
                )

        return unlease

    # -- Broker -----------------------------------------------------------------

    async def ping(self) -> None:
        """Open (creating if needed) the file and its tables."""
        await self._db.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        # One transaction; all encoded before anything is written.
        jobs = [_job(e) for e in envelopes]

        def publish(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                self._insert(conn, jobs, now_epoch())

        await self._db.run(publish)
        self._hub.queues_changed()

    def jobs_of(self, envelopes: Sequence[Envelope]) -> list[_NewJob]:
        """Envelopes encoded for :meth:`insert_jobs` (checked as ``publish`` checks them)."""
        check_publishable(envelopes)
        return [_job(e) for e in envelopes]

    def insert_jobs(self, conn: sqlite3.Connection, jobs: Sequence[_NewJob]) -> None:
        """Insert encoded jobs inside the caller's transaction (the store's publish_new)."""
        self._insert(conn, jobs, now_epoch())

    def published(self) -> None:
        """After a commit that inserted jobs: wake this process's fetchers."""
        self._hub.queues_changed()

    async def publish_raw(self, queue: str, raw: bytes, *, priority: int = 0) -> None:
        """Insert bytes as-is; a decodable ``notBefore``/``visibilityTimeout`` is honoured.

        The stored priority and lease length are clamped (:mod:`stem.limits`).
        """
        env, _ = decode_stored(raw)
        job: _NewJob = (
            queue,
            clamp_priority(priority),
            None if env is None else env.not_before_epoch,
            env.id if env is not None else peek_task_id(raw),
            None if env is None else lease_seconds(env.visibility_timeout),
            bytes(raw),
        )

        def publish(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                self._insert(conn, [job], now_epoch())

        await self._db.run(publish)
        self._hub.queues_changed()

    async def _watch(self, queues: list[str], consumer: str, block: float) -> _Wakeup:
        return _Wakeup(self._hub)

    async def _claim(self, queues: list[str], max_count: int, consumer: str, polled: bool
                     ) -> Claim:
        # After a poll that timed out, look (read-only) before taking the write lock.
        token, claimed = await self._db.submit(self._claim_sql(queues, max_count, consumer, polled))
        if not claimed:
            return NOTHING
        out = []
        for queue, (row_id, _, _, raw, until, deliveries) in claimed:
            out.append(delivery(queue, raw, f"{row_id}:{token}", SqliteLease(row_id, token),
                                until, deliveries > 1))
        return Claim(out)

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        leases = leases_of(deliveries)
        if not leases:
            return

        def ack(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                self.delete_leased(conn, leases)

        await self._db.run(ack)

    def delete_leased(self, conn: sqlite3.Connection, leases: list[SqliteLease]) -> None:
        """Delete rows whose lease is still held, inside the caller's transaction."""
        conn.executemany(f"DELETE FROM {self._jobs} WHERE id = ? AND lease_token = ?", leases)

    async def _nack(self, deliveries: Sequence[Delivery]) -> None:
        # The rows are fetchable at once, in their old place.
        leases = leases_of(deliveries)
        if not leases:
            return
        await self._db.run(self._unlease(leases))
        self._hub.queues_changed()

    async def _retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        # Each still-held row deleted and its replacement inserted, in one transaction.
        work = [(d.lease, _job(env)) for d, env in items if isinstance(d.lease, SqliteLease)]
        if not work:
            return
        jobs = self._jobs

        def retry(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                replacements = [
                    job
                    for lease, job in work
                    if conn.execute(
                        f"DELETE FROM {jobs} WHERE id = ? AND lease_token = ?", lease
                    ).rowcount
                ]
                self._insert(conn, replacements, now_epoch())

        await self._db.run(retry)
        self._hub.queues_changed()

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        work = [(*d.lease, reason) for d, reason in items if isinstance(d.lease, SqliteLease)]
        if not work:
            return
        jobs, dead = self._jobs, self._dead

        sweep = self._sweep_due()

        def dead_letter(conn: sqlite3.Connection) -> None:
            now = now_epoch()
            with immediate(conn):
                if sweep:
                    self._sweep(conn, now)
                for row_id, token, reason in work:
                    row = conn.execute(
                        f"DELETE FROM {jobs} WHERE id = ? AND lease_token = ? "
                        "RETURNING queue, task_id, priority, raw",
                        (row_id, token),
                    ).fetchone()
                    if row is not None:
                        conn.execute(
                            f"INSERT INTO {dead} (queue, task_id, priority, raw, reason, dead_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (*row, reason, now),
                        )

        await self._db.run(dead_letter)

    async def _extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        leases = [(d, d.lease) for d in deliveries if isinstance(d.lease, SqliteLease)]
        if not leases:
            return
        jobs = self._jobs

        def extend(conn: sqlite3.Connection) -> tuple[float, list[bool]]:
            until = now_epoch() + seconds
            with immediate(conn):
                held = [
                    conn.execute(
                        f"UPDATE {jobs} SET locked_until = ? WHERE id = ? AND lease_token = ?",
                        (until, *lease),
                    ).rowcount
                    == 1
                    for _, lease in leases
                ]
            return until, held

        until, held = await self._db.run(extend)
        for (d, _), ok in zip(leases, held, strict=True):
            if ok:
                d.lease_expires_at = until

    async def stats(self, queue: str) -> QueueStats:
        """Ready, delayed, leased and dead counts of ``queue`` (one consistent read)."""
        jobs, dead = self._jobs, self._dead

        def stats(conn: sqlite3.Connection) -> tuple[int, int, int, int]:
            now = now_epoch()
            row: tuple[int, int, int, int] = conn.execute(
                # COALESCE(locked_until, 0) <= now: not leased, or the lease expired.
                "SELECT "
                "COALESCE(SUM(COALESCE(locked_until, 0) <= :now AND not_before <= :now), 0), "
                "COALESCE(SUM(COALESCE(locked_until, 0) <= :now AND not_before > :now), 0), "
                "COALESCE(SUM(locked_until > :now), 0), "
                f"(SELECT COUNT(*) FROM {dead} WHERE queue = :queue) "
                f"FROM {jobs} WHERE queue = :queue",
                {"now": now, "queue": queue},
            ).fetchone()
            return row

        pending, delayed, in_flight, n_dead = await self._db.run(stats)
        return QueueStats(
            queue=queue, pending=pending, delayed=delayed, in_flight=in_flight, dead=n_dead
        )

    async def purge(self, queue: str) -> int:
        """Delete ready and delayed rows (expired leases count as ready); leased rows stay."""
        jobs = self._jobs

        def purge(conn: sqlite3.Connection) -> int:
            now = now_epoch()
            with immediate(conn):
                n: int = conn.execute(
                    f"DELETE FROM {jobs} WHERE queue = ? "
                    "AND (locked_until IS NULL OR locked_until <= ?)",
                    (queue, now),
                ).rowcount
            return n

        return await self._db.run(purge)

    def _sweep_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_sweep < DEAD_LETTER_SWEEP_INTERVAL:
            return False
        self._last_sweep = now
        return True

    def _sweep(self, conn: sqlite3.Connection, now: float) -> int:
        n: int = conn.execute(f"DELETE FROM {self._dead} WHERE dead_at < ?",
                              (now - self.dead_letter_retention,)).rowcount
        return n

    async def sweep_dead_letters(self) -> int:
        """Delete the dead letters (of every queue) older than ``dead_letter_retention``
        now; return how many. Also done at most once a minute as the broker dead-letters
        or lists dead letters, so a store keeps about a week of them by default."""
        self._last_sweep = time.monotonic()

        def sweep(conn: sqlite3.Connection) -> int:
            with immediate(conn):
                return self._sweep(conn, now_epoch())

        return await self._db.run(sweep)

    async def dead_letters(self, queue: str, limit: int = 100, *, offset: int = 0,
                           since: float | None = None) -> list[DeadLetter]:
        """Dead letters of ``queue``, oldest first (see :class:`stem.ports.Broker`)."""
        dead = self._dead
        if self._sweep_due():
            await self.sweep_dead_letters()

        def read(conn: sqlite3.Connection) -> list[_DeadRow]:
            rows: list[_DeadRow] = conn.execute(
                f"SELECT id, task_id, raw, reason, dead_at FROM {dead} "
                "WHERE queue = ? AND dead_at >= ? ORDER BY id LIMIT ? OFFSET ?",
                (queue, _since(since), max(0, limit), max(0, offset)),
            ).fetchall()
            return rows

        return [_letter(queue, row) for row in await self._db.run(read)]

    async def get_dead_letter(self, queue: str, dead_letter_id: str) -> DeadLetter | None:
        """The newest dead letter of ``queue`` with this id, or None."""
        dead = self._dead
        row_id = _row_id(dead_letter_id)

        def read(conn: sqlite3.Connection) -> list[_DeadRow]:
            rows: list[_DeadRow] = conn.execute(
                f"SELECT id, task_id, raw, reason, dead_at FROM {dead} "
                "WHERE queue = ? AND (task_id = ? OR id = ?) ORDER BY id DESC",
                (queue, dead_letter_id, row_id),
            ).fetchall()
            return rows

        for row in await self._db.run(read):
            letter = _letter(queue, row)
            if letter.id == dead_letter_id:
                return letter
        return None

    async def replay_dead_letters(
        self,
        queue: str,
        limit: int | None = None,
        *,
        ids: Sequence[str] | None = None,
        since: float | None = None,
        delay: float | None = None,
    ) -> int:
        """Re-publish decodable dead letters (attempt 0), oldest first (see the port).

        Undecodable ones stay in the dead-letter table: publishing the same bad bytes
        again could only dead-letter them again.
        """
        dead = self._dead
        wanted = None if ids is None else set(ids)

        def replay(conn: sqlite3.Connection) -> int:
            now = now_epoch()
            with immediate(conn):
                cursor = conn.execute(
                    f"SELECT id, raw FROM {dead} WHERE queue = ? AND dead_at >= ? ORDER BY id",
                    (queue, _since(since)),
                )
                done: list[int] = []
                jobs: list[_NewJob] = []
                while limit is None or len(done) < limit:
                    batch = cursor.fetchmany(500)
                    if not batch:
                        break
                    for row_id, raw in batch:
                        env, _ = decode_stored(raw)
                        if env is None or (wanted is not None and env.id not in wanted):
                            continue
                        jobs.append(_job(replayed(env, delay), queue))
                        done.append(row_id)
                        if limit is not None and len(done) >= limit:
                            break
                cursor.close()
                self._insert(conn, jobs, now)
                for part in chunks(done):
                    conn.execute(
                        f"DELETE FROM {dead} WHERE id IN ({placeholders(len(part))})", part
                    )
            return len(done)

        n = await self._db.run(replay)
        if n:
            self._hub.queues_changed()
        return n

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead letter of ``queue``."""
        dead = self._dead

        def purge(conn: sqlite3.Connection) -> int:
            with immediate(conn):
                n: int = conn.execute(f"DELETE FROM {dead} WHERE queue = ?", (queue,)).rowcount
            return n

        return await self._db.run(purge)

    async def _interrupt(self) -> None:
        self._hub.queues_changed()

    async def _close(self) -> None:
        # The connection and its thread (the broker reopens them if used again).
        if self._owns_db:
            await self._db.close()
