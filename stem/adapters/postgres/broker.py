"""The Postgres broker: a jobs table leased with ``FOR UPDATE SKIP LOCKED``.

A job row is *available* when its ``not_before`` has passed and it has no lease or
an expired one; ``fetch`` leases available rows by stamping ``locked_until``,
``owner`` and a fresh ``lease`` token in one ``UPDATE ... WHERE id IN (SELECT ...
FOR UPDATE SKIP LOCKED LIMIT n) RETURNING``. Every later action on a delivery (ack,
nack, retry, dead-letter, extend) matches on ``(id, lease)``, so a worker whose lease
expired and was handed to someone else cannot touch the new holder's job. Expired
leases need no sweeper: the fetch query's WHERE clause treats them as available.

Idle fetchers wait on ``LISTEN`` (one dedicated connection per broker); publish, nack
and retry NOTIFY the queue name in the same statement that writes the rows, so the
wake-up is sent exactly when the rows become visible. A timer covers what nobody
announces: the next delayed job coming due and the next lease expiring.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg

from stem._aio import within
from stem.adapters._leasing import NOTHING, Claim, LeasingBroker, delivery
from stem.adapters._shared import (
    DEAD_LETTER_SWEEP_INTERVAL,
    check_publishable,
    decode_stored,
    lease_seconds,
    replayed,
)
from stem.adapters.postgres._pool import Connector, ListenHub, parse_url
from stem.adapters.postgres._sql import Statements
from stem.adapters.postgres.backend import results_channel, status_arrays
from stem.envelope import Envelope, peek_task_id
from stem.errors import ServiceUnavailableError
from stem.limits import clamp_priority
from stem.log import get_logger
from stem.ports import (
    DEFAULT_RESULT_TTL,
    DEFAULT_VISIBILITY_TIMEOUT,
    DeadLetter,
    Delivery,
    QueueStats,
)
from stem.status import TaskStatus

#: Longest an idle fetch sleeps without LISTEN (while its connection is being
#: re-established) before looking at the table again.
FALLBACK_POLL = 1.0
#: Batches at least this large are published with COPY instead of one INSERT.
COPY_MIN_BATCH = 64
#: Jobs-table rows leased or deleted by this process between two vacuums of it.
VACUUM_EVERY = 20_000
#: Seconds between two vacuums started by this process.
VACUUM_MIN_INTERVAL = 5.0
#: Rows leased or deleted since the last vacuum that make a fetch finding its queues
#: empty vacuum the jobs table (a drained backlog's dead rows and pages, at once).
IDLE_VACUUM_MIN = 1_000
#: Seconds after the last vacuum started here before an idle fetch starts one.
IDLE_VACUUM_INTERVAL = 1.0
#: Seconds an idle fetch waits for this process's leased rows to be settled before
#: vacuuming anyway (long tasks).
IDLE_VACUUM_WAIT = 60.0
#: Seconds between two checks of the planner's row count for the jobs table.
STATS_CHECK_INTERVAL = 5.0
#: Live rows below which a stale row count cannot hurt a plan (no ANALYZE).
STATS_MIN_ROWS = 2_000
#: Rows published by this process after which it checks the planner's row count
#: (twice STATS_MIN_ROWS: a check must see a backlog big enough to act on).
PUBLISHED_CHECK_ROWS = 2 * STATS_MIN_ROWS

log = get_logger(__name__)
#: Dead letters read per page while replaying.
_REPLAY_PAGE = 500
#: Pause before re-querying when a due job exists but was locked by another fetcher.
_CONTENDED_RETRY = 0.05

# Parallel arrays for the publish statements, in their parameter order.
_PublishArrays = tuple[
    list[str | None],
    list[str],
    list[int],
    list[float | None],
    list[float | None],
    list[int],
    list[bytes],
]


def _publish_arrays(items: Sequence[tuple[Envelope, bytes, str]]) -> _PublishArrays:
    """Arrays for (envelope, encoded bytes, queue) triples (priority and lease length
    clamped to :mod:`stem.limits`)."""
    return (
        [e.id for e, _, _ in items],
        [q for _, _, q in items],
        [clamp_priority(e.priority) for e, _, _ in items],
        [e.not_before_epoch for e, _, _ in items],
        [lease_seconds(e.visibility_timeout) for e, _, _ in items],
        [_int4(e.attempt) for e, _, _ in items],
        [raw for _, raw, _ in items],
    )


def _check_connection(connection: Any) -> None:
    if not isinstance(connection, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        raise TypeError(
            "publishing with connection= needs an asyncpg connection (asyncpg.Connection "
            f"or a pool connection), got {type(connection).__name__}"
        )


class PostgresLease(NamedTuple):
    """A Postgres delivery's lease: its job row and the lease token the fetch wrote."""

    job_id: int
    lease: uuid.UUID


def _keys(deliveries: Sequence[Delivery]) -> tuple[list[int], list[uuid.UUID]]:
    """The job ids and lease tokens of ``deliveries`` (parallel arrays for the SQL)."""
    ids: list[int] = []
    leases: list[uuid.UUID] = []
    for d in deliveries:
        lease = d.lease
        if not isinstance(lease, PostgresLease):
            raise TypeError(f"delivery {d.receipt!r} was not fetched from a Postgres broker")
        ids.append(lease.job_id)
        leases.append(lease.lease)
    return ids, leases


def _int4(n: int) -> int:
    """``n`` within Postgres' int4 (an attempt number read from foreign bytes)."""
    return min(max(n, -(2**31)), 2**31 - 1)


def _dead_letter_id(envelope: Envelope | None, task_id: str | None, raw: bytes, row: int
                    ) -> str:
    """A dead letter's id: the envelope's id when decodable, else the stored task id,
    else an id readable from the bytes, else ``dead-letter-<row>``."""
    if envelope is not None:
        return envelope.id
    return task_id or peek_task_id(raw) or f"dead-letter-{row}"


def _letter(r: Any) -> DeadLetter:
    """A dead-letter row as a :class:`DeadLetter`."""
    raw = bytes(r["envelope"])
    envelope, _ = decode_stored(raw)
    meta: dict[str, Any] = {"attempt": r["attempt"]}
    if r["owner"] is not None:
        meta["consumer"] = r["owner"]
    return DeadLetter(
        # The task id when readable (what users look tasks up by): the envelope's,
        # else the column's (rows written without it).
        id=_dead_letter_id(envelope, r["task_id"], raw, r["id"]),
        queue=r["queue"],
        raw=raw,
        reason=r["reason"],
        dead_at=r["dead_at"],
        envelope=envelope,
        meta=meta,
    )


def _row_count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 12".
    return int(status.rsplit(" ", 1)[-1])


class _Wakeup:
    """A fetch's wake-up: a NOTIFY for one of its queues (any relevant notification
    bumps the broker's generation, so one that lands between the claim and the wait
    is not lost), or a slow poll while LISTEN is down."""

    __slots__ = ("_broker", "_closes", "_generation", "_listening")

    def __init__(self, broker: PostgresBroker, listening: bool) -> None:
        self._broker = broker
        self._listening = listening
        self._generation = broker._generation
        self._closes = broker._closes

    def arm(self) -> None:
        self._generation = self._broker._generation

    async def wait(self, seconds: float) -> bool:
        broker = self._broker
        if not self._listening:
            seconds = min(seconds, FALLBACK_POLL)
        woken = True
        if self._generation == broker._generation:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            broker._waiters.add(waiter)
            try:
                await within(waiter, seconds)
            except TimeoutError:
                woken = False
            finally:
                broker._waiters.discard(waiter)
        if broker._closes == self._closes:  # a closed broker must not LISTEN again
            self._listening = await broker._listener.ensure()
        return woken

    def close(self) -> None:
        pass


class PostgresBroker(LeasingBroker):
    """:class:`stem.ports.Broker` on a Postgres schema (see the module docstring).

    Multiple queues: within one fetch, earlier queues in the list first, then higher
    priority, then older jobs; like every adapter, every few fetches start at a later
    queue (:class:`stem.adapters._shared.FairOrder`), so a busy queue listed first
    cannot starve the others.

    Beyond the port: :meth:`publish_with_connection` (transactional enqueue through
    the caller's connection) and :meth:`ack_with_results` (ack plus result write in
    one statement, what :class:`PostgresStore` offers as its atomic ack).
    """

    kind = "postgres"
    lease_type = PostgresLease

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "stem",
        default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        connector: Connector | None = None,
        hub: ListenHub | None = None,
    ) -> None:
        super().__init__()
        self.settings = parse_url(url, namespace)
        self.namespace = namespace
        self.default_visibility_timeout = default_visibility_timeout
        # A store passes the pool and LISTEN connection its parts share; alone, own them.
        self._owns_db = connector is None
        self._db = Connector(self.settings, "broker") if connector is None else connector
        self._hub = ListenHub(self._db) if hub is None else hub
        self._sql = Statements(self.settings.quoted_schema)
        self._channel = self.settings.channel("jobs")
        self._listener = self._hub.channel(self._channel, self._on_notify, self._wake_all)
        # Queues some fetch has asked for; notifications for other queues are ignored
        # so a busy unrelated queue does not make idle fetchers re-query.
        self._watched: set[str] = set()
        # Bumped by every relevant notification; fetch compares it before and after
        # looking at the table, so a NOTIFY that lands while the worker is busy (not
        # waiting) is not lost: the next fetch sees the bump and queries again.
        self._generation = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._churn = 0
        # Rows this process leased and has not settled yet (a fetch finding nothing
        # while some are still out is a drain's tail, not a drained queue).
        self._held = 0
        self._idle_since: float | None = None
        self._last_sweep = float("-inf")
        self._last_vacuum = 0.0
        self._last_stats_check = float("-inf")
        self._vacuum_failed = False
        # Rows this process published since it last checked the planner's row count,
        # and their queues: a producer's bulk enqueue gets the count right before any
        # worker plans a fetch of that backlog.
        self._published = 0
        self._published_queues: set[str] = set()
        # The first fetch checks the row count before it runs (not in the background).
        self._first_claim = True

    # -- notifications --------------------------------------------------------

    def _on_notify(self, queue: str) -> None:
        if queue in self._watched:
            self._wake_all()

    def _wake_all(self) -> None:
        self._generation += 1
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    # -- maintenance ------------------------------------------------------------

    def _touched(self, rows: int) -> None:
        """Count jobs-table churn; past VACUUM_EVERY rows, vacuum it in the background.

        Every lease and every ack leaves a dead row version. A queue table churns far
        faster than autovacuum's defaults assume (and autovacuum may be off), and
        dead versions make every SKIP LOCKED scan slower, so the broker reclaims them
        itself: one process at a time, under a try-lock, never blocking the caller.
        """
        self._churn += rows
        now = time.monotonic()
        if now - self._last_stats_check >= STATS_CHECK_INTERVAL and not self._vacuum_failed:
            self._last_stats_check = now
            self._in_background(self.refresh_stats())
        if self._churn < VACUUM_EVERY or self._vacuum_failed:
            return
        if now - self._last_vacuum < VACUUM_MIN_INTERVAL:
            return
        self._churn = 0
        self._last_vacuum = now
        self._in_background(self.vacuum())

    def _publishing(self, items: Sequence[tuple[Envelope, bytes, str]]) -> None:
        """Count rows published; past PUBLISHED_CHECK_ROWS, check the planner's row count in
        the background (at most every STATS_CHECK_INTERVAL seconds).

        The backlog a producer just wrote is what the next fetches plan against: when
        the table's row count is stale (an emptied table, autovacuum off or not yet
        run), a worker's first fetches would sort the whole backlog each time.
        """
        self._published += len(items)
        if len(self._published_queues) < 64:
            self._published_queues.update(q for _, _, q in items)
        if self._published <= PUBLISHED_CHECK_ROWS or self._vacuum_failed:
            return
        now = time.monotonic()
        if now - self._last_stats_check >= STATS_CHECK_INTERVAL:
            self._last_stats_check = now
            self._published = 0
            self._in_background(self.refresh_stats())

    def _idle(self) -> None:
        """A fetch found its queues empty: vacuum what the drained backlog left.

        Between two VACUUM_EVERY vacuums up to that many dead rows pile up, and
        nothing vacuums them once the queue is drained (autovacuum may be off): the
        table would keep the backlog's size and dead rows until the next backlog,
        whose fetches then walk past the dead index entries. Vacuumed while empty,
        the table is truncated to (nearly) nothing. So once this process has settled
        all it leased (its own drain's tail acked) and at least IDLE_VACUUM_MIN rows
        churned; if another vacuum is running (one started during the drain), the
        next idle fetch tries again.
        """
        now = time.monotonic()
        if (self._churn < IDLE_VACUUM_MIN or self._vacuum_failed
                or now - self._last_vacuum < IDLE_VACUUM_INTERVAL):
            return
        if self._held > 0:  # the tail is still out
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since < IDLE_VACUUM_WAIT:
                return
        self._idle_since = None
        churn, self._churn = self._churn, 0
        self._last_vacuum = now
        self._in_background(self._idle_vacuum(churn))

    async def _idle_vacuum(self, churn: int) -> None:
        if not await self.vacuum():
            self._churn += churn  # not this time: at the next idle fetch

    def _settled(self, rows: int) -> None:
        self._held = max(0, self._held - rows)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh_stats(self) -> bool:
        """ANALYZE the jobs table if the planner's row count for it is far off; True if
        this process did.

        A queue table swings from empty to a large backlog between two autovacuums
        (autovacuum may be off): with the stale count of an emptied table the fetch
        plans a sort of the whole backlog on every call instead of walking the fetch
        index, several times slower until statistics catch up. One cheap comparison of
        the planner's count (``reltuples``) with the live one every few seconds keeps
        every hot statement's plan right. The live count reaches the statistics views
        only when the producers' sessions report it (seconds later, after a whole
        drain of a small backlog), so the rows of the queues fetched from are also
        counted, up to twice STATS_MIN_ROWS (one short index walk): enough to see a
        backlog in a table the planner believes empty.
        """
        table = f"{self.settings.quoted_schema}.stem_jobs"

        async def op(conn: Any) -> bool:
            queues = sorted(self._watched | self._published_queues)
            row = await conn.fetchrow(self._sql.table_stats, queues, 2 * STATS_MIN_ROWS)
            if row is None:
                return False
            planned, live = float(row[0]), max(float(row[1] or 0), float(row[2]))
            if not (live > STATS_MIN_ROWS and (planned < live / 2 or planned > live * 2)):
                return False
            return bool(await self._maintain(conn, f"ANALYZE {table}"))

        try:
            return bool(await self._db.run(op, retry=False))
        except ServiceUnavailableError as exc:
            # An outage, not a refusal: the next check tries again.
            log.debug("postgres.analyze_skipped", table=table, error=repr(exc))
            return False
        except Exception as exc:
            self._vacuum_failed = True
            log.warning("postgres.analyze_failed", table=table, error=repr(exc))
            return False

    async def _maintain(self, conn: Any, statement: str) -> bool:
        """Run a maintenance statement unless another process runs one right now."""
        key = f"stem-vacuum:{self.settings.schema}"
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            return False  # another process is maintaining it right now
        try:
            await conn.execute(statement)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
        return True

    async def vacuum(self) -> bool:
        """Vacuum (and analyze) the jobs table now unless another process is; True if
        this one did."""
        table = f"{self.settings.quoted_schema}.stem_jobs"

        async def op(conn: Any) -> bool:
            # ANALYZE too: after heavy churn the planner's row count is stale as well.
            return await self._maintain(conn, f"VACUUM (ANALYZE) {table}")

        try:
            return bool(await self._db.run(op, retry=False))
        except Exception as exc:
            # E.g. not the table's owner: leave it to autovacuum, and say so once.
            self._vacuum_failed = True
            log.warning("postgres.vacuum_failed", table=table, error=repr(exc))
            return False

    # -- port -----------------------------------------------------------------

    async def ping(self) -> None:
        """Connect (migrating on first use) and run a trivial query; fail fast."""
        await self._db.run(lambda c: c.fetchval("SELECT 1"), retry=False)

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        # One statement that also NOTIFYs their queues.
        items = [(e, e.to_json(), e.queue) for e in envelopes]
        await self._db.run(lambda c: self._insert(c, items))
        self._publishing(items)

    async def publish_with_connection(self, connection: Any, envelopes: Sequence[Envelope]) -> None:
        """Insert envelopes through the caller's asyncpg ``connection``.

        Inside the caller's transaction the jobs exist only if it commits (and the
        wake-up NOTIFY is delivered at that commit); on rollback nothing was enqueued.
        The connection must reach the same database as this broker's URL. The schema
        is migrated beforehand over the broker's own pool, never inside the caller's
        transaction.
        """
        _check_connection(connection)
        if not envelopes:
            return
        check_publishable(envelopes)
        items = [(e, e.to_json(), e.queue) for e in envelopes]
        await self._db.ready()
        await self._insert(connection, items)

    async def publish_new(
        self,
        items: Sequence[tuple[Envelope, TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
        connection: Any = None,
        locks: Mapping[str, tuple[str, float]] | None = None,
        lock_sql: Any = None,
    ) -> set[str]:
        """Publish the envelopes whose id has no status yet, each with its status, in one
        statement (one transaction); return the ids published.

        Unique tasks (``locks``: id -> (lock key, seconds), with ``lock_sql`` the lock
        store's statements) first take their lock, owned by their id, in the same
        transaction: one whose id already has a status or whose lock another task holds
        is skipped. A concurrent producer of the same key waits on the lock row until
        this transaction ends, then finds it taken.

        For :meth:`PostgresStore.publish_new`. With ``connection`` (an asyncpg connection
        of the caller's, as in :meth:`publish_with_connection`) the statuses and jobs
        exist only if the caller's transaction commits. Ids must be unique in ``items``.
        """
        if not items:
            return set()
        if connection is not None:
            _check_connection(connection)
        envelopes = [e for e, _, _ in items]
        check_publishable(envelopes)
        jobs = [(e, e.to_json(), e.queue) for e in envelopes]
        blobs = [s.to_json() for _, s, _ in items]
        ttls = [default_ttl if t is None else float(t) for _, _, t in items]
        if locks:
            async def unique(conn: Any) -> set[str]:
                async with conn.transaction():
                    live = {r[0] for r in await conn.fetch(self._sql.live_results, list(locks))}
                    denied = {task_id for task_id, (key, ttl) in locks.items()
                              if task_id in live or not await conn.fetchval(
                                  lock_sql.acquire, key, task_id, float(ttl))}
                    keep = [i for i, j in enumerate(jobs) if j[0].id not in denied]
                    if not keep:
                        return set()
                    return await self._insert_new(conn, [jobs[i] for i in keep],
                                                  [blobs[i] for i in keep],
                                                  [ttls[i] for i in keep])

            if connection is not None:
                await self._db.ready()
                return await unique(connection)
            return await self._db.run(unique)
        if connection is not None:
            await self._db.ready()
            return await self._insert_new(connection, jobs, blobs, ttls)
        added = await self._db.run(lambda c: self._insert_new(c, jobs, blobs, ttls))
        self._publishing(jobs)
        return added

    async def _insert_new(self, conn: Any, jobs: Sequence[tuple[Envelope, bytes, str]],
                          blobs: list[bytes], ttls: list[float]) -> set[str]:
        if len(jobs) >= COPY_MIN_BATCH:
            # Statuses by one INSERT, then COPY only the new jobs, in one transaction.
            ids = [e.id for e, _, _ in jobs]
            async with conn.transaction():
                rows = await conn.fetch(self._sql.add_results, ids, ["queued"] * len(ids),
                                        blobs, ttls)
                added = {r[0] for r in rows}
                fresh = [j for j in jobs if j[0].id in added]
                if fresh:
                    await self._copy(conn, fresh, own_transaction=True)
            return added
        if len(jobs) == 1:
            one = await conn.fetchrow(self._sql.publish_new_one,
                                      *(a[0] for a in _publish_arrays(jobs)), self._channel,
                                      blobs[0], ttls[0])
            return set() if one is None else {one[0]}
        row = await conn.fetchrow(self._sql.publish_new, *_publish_arrays(jobs), self._channel,
                                  blobs, ttls)
        return set(row["ids"])

    async def publish_raw(self, queue: str, raw: bytes, *, priority: int = 0) -> None:
        """Insert bytes as they are; they are decoded (or found undecodable) at fetch.

        When the bytes are a readable envelope its id, ``notBefore``, visibility
        timeout and attempt are honoured as ``publish`` would. The stored priority and
        lease length are clamped to :mod:`stem.limits`; the bytes are kept as given.
        """
        e, _ = decode_stored(raw)
        prio = clamp_priority(priority)
        args: tuple[Any, ...]
        if e is None:
            args = (peek_task_id(raw), queue, prio, None, None, 0, raw)
        else:
            args = (e.id, queue, prio, e.not_before_epoch, lease_seconds(e.visibility_timeout),
                    _int4(e.attempt), raw)
        await self._db.run(lambda c: c.execute(self._sql.publish_one, *args, self._channel))

    async def _insert(self, conn: Any, items: Sequence[tuple[Envelope, bytes, str]]) -> None:
        if len(items) >= COPY_MIN_BATCH:
            await self._copy(conn, items)
            return
        arrays = _publish_arrays(items)
        if len(items) == 1:
            # Scalars encode faster than one-element arrays: the one-by-one enqueue path.
            await conn.execute(self._sql.publish_one, *(a[0] for a in arrays), self._channel)
        else:
            await conn.execute(self._sql.publish, *arrays, self._channel)

    async def _copy(self, conn: Any, items: Sequence[tuple[Envelope, bytes, str]], *,
                    own_transaction: bool = False) -> None:
        """A large batch by COPY (several times faster than one INSERT of arrays).

        Rows without a ``not_before`` leave the column out so the server's ``now()``
        applies, never the producer's clock. COPY and the wake-up NOTIFY share one
        transaction (a savepoint inside a caller's transaction).
        """
        ready = [(e.id, q, clamp_priority(e.priority), lease_seconds(e.visibility_timeout),
                  _int4(e.attempt), raw)
                 for e, raw, q in items if e.not_before is None]
        delayed = [(e.id, q, clamp_priority(e.priority), e.not_before,
                    lease_seconds(e.visibility_timeout), _int4(e.attempt), raw)
                   for e, raw, q in items if e.not_before is not None]
        schema = self.settings.schema

        async def copy() -> None:
            if ready:
                await conn.copy_records_to_table(
                    "stem_jobs", schema_name=schema, records=ready,
                    columns=["task_id", "queue", "priority", "visibility", "attempt", "envelope"])
            if delayed:
                await conn.copy_records_to_table(
                    "stem_jobs", schema_name=schema, records=delayed,
                    columns=["task_id", "queue", "priority", "not_before", "visibility",
                             "attempt", "envelope"])
            queues = list(dict.fromkeys(q for _, _, q in items))
            await conn.execute(self._sql.notify_queues, self._channel, queues)

        if own_transaction:
            # Inside publish_new's transaction (or savepoint), which a failure rolls
            # back whole: a savepoint of our own would only add two round trips.
            await copy()
        else:
            async with conn.transaction():
                await copy()

    async def _watch(self, queues: list[str], consumer: str, block: float) -> _Wakeup:
        self._watched.update(queues)
        # LISTEN must be active before the first look at the table, or a job
        # published between that look and LISTEN would go unnoticed until the timer.
        return _Wakeup(self, block > 0 and await self._listener.ensure())

    async def _claim(self, queues: list[str], max_count: int, consumer: str, polled: bool
                     ) -> Claim:
        if self._first_claim:
            # This process's first fetch: a backlog written while the planner's row
            # count was stale would otherwise be sorted whole by every fetch until the
            # background check below (seconds later) catches it.
            self._first_claim = False
            self._last_stats_check = time.monotonic()
            await self.refresh_stats()
        lease = uuid.uuid4()
        order: str | list[str]
        if len(queues) == 1:
            sql, order = self._sql.fetch_one_queue, queues[0]
        else:
            sql, order = self._sql.fetch_many_queues, queues
        # No retries here: fetch retries an outage within its ``block``.
        rows = await self._db.run(
            lambda c: c.fetch(
                sql, order, max_count, self.default_visibility_timeout, consumer, lease
            ),
            retry=False,
        )
        if not rows:
            self._idle()
            return NOTHING
        self._held += len(rows)
        self._idle_since = None
        self._touched(len(rows))
        out = []
        for row in rows:
            job_id, queue, raw, until, deliveries = row[:5]
            # Unique per lease, not per job: a redelivery is a different receipt.
            out.append(delivery(queue, bytes(raw), f"{job_id}:{lease}",
                                PostgresLease(job_id, lease), until, deliveries > 1))
        return Claim(out)

    async def _next_due(self, queues: list[str]) -> float | None:
        due = await self._db.run(lambda c: c.fetchval(self._sql.next_due, queues), retry=False)
        if due is None:
            return None
        # Due already but not leased: another fetcher holds it locked right now.
        return float(due) if due > 0 else _CONTENDED_RETRY

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        # One statement.
        ids, leases = _keys(deliveries)
        await self._db.run(lambda c: c.execute(self._sql.ack, ids, leases))
        self._settled(len(ids))
        self._touched(len(ids))

    async def _nack(self, deliveries: Sequence[Delivery]) -> None:
        # Jobs keep their place in line; the statement NOTIFYs idle fetchers.
        ids, leases = _keys(deliveries)
        await self._db.run(lambda c: c.execute(self._sql.nack, ids, leases, self._channel))
        self._settled(len(ids))

    async def _retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        # One statement swaps each still-leased job for its replacement.
        ids, leases = _keys([d for d, _ in items])
        arrays = _publish_arrays([(e, e.to_json(), e.queue) for _, e in items])
        await self._db.run(
            lambda c: c.execute(self._sql.retry, ids, leases, *arrays, self._channel)
        )
        self._settled(len(ids))

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        ids, leases = _keys([d for d, _ in items])
        reasons = [r for _, r in items]
        await self._db.run(lambda c: c.execute(self._sql.dead_letter, ids, leases, reasons))
        self._settled(len(ids))
        await self._maybe_sweep()

    async def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= DEAD_LETTER_SWEEP_INTERVAL:
            self._last_sweep = now
            await self.sweep_dead_letters()

    async def sweep_dead_letters(self) -> int:
        """Delete the dead letters (of every queue) older than the URL's
        ``dead_letter_retention`` (default 7 days) now; return how many. Also done at most
        once a minute as the broker dead-letters or lists dead letters."""
        self._last_sweep = time.monotonic()
        status = await self._db.run(lambda c: c.execute(
            self._sql.sweep_dead_letters, self.settings.dead_letter_retention))
        return _row_count(status)

    async def _extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        ids, leases = _keys(deliveries)
        rows = await self._db.run(lambda c: c.fetch(self._sql.extend, ids, leases, seconds))
        until = {r[0]: r[1] for r in rows}
        for d, job_id in zip(deliveries, ids, strict=True):
            if job_id in until:
                d.lease_expires_at = until[job_id]

    async def stats(self, queue: str) -> QueueStats:
        """Counts of ready, delayed, leased and dead-lettered jobs of ``queue``."""
        row = await self._db.run(lambda c: c.fetchrow(self._sql.stats, queue))
        return QueueStats(
            queue=queue,
            pending=row["pending"],
            delayed=row["delayed"],
            in_flight=row["in_flight"],
            dead=row["dead"],
        )

    async def purge(self, queue: str) -> int:
        """Delete the ready and delayed jobs of ``queue`` (leased ones stay)."""
        status = await self._db.run(lambda c: c.execute(self._sql.purge, queue))
        return _row_count(status)

    async def delete(self, queue: str, task_ids: Sequence[str]) -> int:
        """Delete the waiting jobs of ``queue`` with these task ids (leased ones stay)."""
        if not task_ids:
            return 0
        sql = self._sql.purge + " AND task_id = ANY($2::text[])"
        status = await self._db.run(lambda c: c.execute(sql, queue, list(task_ids)))
        return _row_count(status)

    async def dead_letters(self, queue: str, limit: int = 100, *, offset: int = 0,
                           since: float | None = None) -> list[DeadLetter]:
        """Dead letters of ``queue``, oldest first (see :class:`stem.ports.Broker`)."""
        await self._maybe_sweep()
        rows = await self._db.run(lambda c: c.fetch(
            self._sql.dead_letters, queue, max(0, limit), max(0, offset), since))
        return [_letter(r) for r in rows]

    async def get_dead_letter(self, queue: str, dead_letter_id: str) -> DeadLetter | None:
        """The newest dead letter of ``queue`` with this id, or None."""
        tail = dead_letter_id.removeprefix("dead-letter-")
        row_id = int(tail) if tail != dead_letter_id and tail.isdigit() and len(tail) < 19 \
            else -1
        rows = await self._db.run(lambda c: c.fetch(
            self._sql.dead_letter_by_id, queue, dead_letter_id, row_id))
        for r in rows:
            letter = _letter(r)
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
        """Move dead letters back to their queue, oldest first, attempt 0 (see the port).

        Undecodable ones stay in the dead-letter table (replaying them could only
        dead-letter them again). A replayed job is a new row, so it counts as a first
        delivery. Taking them out and publishing happen in one transaction.
        """
        wanted = None if ids is None else set(ids)

        async def replay(conn: Any) -> int:
            items: list[tuple[Envelope, bytes, str]] = []
            taken: list[int] = []
            last = 0
            async with conn.transaction():
                while limit is None or len(items) < limit:
                    rows = await conn.fetch(self._sql.dead_letter_page, queue, last,
                                            _REPLAY_PAGE, since)
                    for r in rows:
                        decoded, _ = decode_stored(bytes(r["envelope"]))
                        if decoded is None or (wanted is not None and decoded.id not in wanted):
                            continue
                        env = replayed(decoded, delay)
                        items.append((env, env.to_json(), r["queue"]))
                        taken.append(r["id"])
                        if limit is not None and len(items) >= limit:
                            break
                    if len(rows) < _REPLAY_PAGE:
                        break
                    last = rows[-1]["id"]
                if items:
                    await conn.execute(self._sql.delete_dead_letters, taken)
                    await self._insert(conn, items)
            return len(items)

        return await self._db.run(replay)

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead letter of ``queue``."""
        status = await self._db.run(lambda c: c.execute(self._sql.purge_dead_letters, queue))
        return _row_count(status)

    async def _interrupt(self) -> None:
        self._wake_all()

    async def _close(self) -> None:
        # Stop listening and close the pool.
        await self._listener.close()
        if self._owns_db:
            await self._db.close()

    # -- beyond the port --------------------------------------------------------

    async def ack_with_results(
        self,
        deliveries: Sequence[Delivery],
        statuses: Sequence[tuple[TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
    ) -> None:
        """Write ``statuses`` (as ``ResultBackend.set_many`` would) and ack
        ``deliveries``, in one statement and so one transaction.

        For :meth:`PostgresStore.ack_with_results` (the worker's completer, when broker
        and result backend come from one store): a result and its ack can't be split by
        a crash, and it saves a round-trip per batch. Waiters are notified as by the
        backend.
        """
        if not deliveries and not statuses:
            return
        ids, leases = _keys(deliveries)
        ids_, states, blobs, ttls = status_arrays(statuses, default_ttl)
        channel = results_channel(self.settings)
        await self._db.run(
            lambda c: c.execute(
                self._sql.ack_with_results, ids_, states, blobs, ttls, channel, ids, leases
            )
        )
        self._settled(len(ids))
        self._touched(len(ids))
