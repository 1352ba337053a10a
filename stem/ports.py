"""The contracts between Stem's core and its adapters.

Core code talks to brokers and stores only through these Protocols; every adapter
(memory, sqlite, redis, postgres) implements them and passes the same conformance
suite (:mod:`stem.testing.conformance`, run on each of them by ``tests/conformance/``).
The broker API is batch-first: every call moves a
list so an adapter can do it in one round-trip.

Times are seconds (floats). ``now`` is wall-clock epoch seconds, because delayed
delivery (``notBefore``) and leases must agree across processes and hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.envelope import Envelope
from stem.groups import GroupMember, GroupProgress, GroupRecord
from stem.revoke import RevokeEntry
from stem.status import TaskStatus

#: Lease length used when neither the envelope nor the task sets one.
DEFAULT_VISIBILITY_TIMEOUT = 30.0
#: How long results live when no TTL is given (one day, as in the Dart Stem).
DEFAULT_RESULT_TTL = 86_400.0
#: Runs a schedule store keeps per entry when built without another bound (as the
#: Dart Stem's history streams).
DEFAULT_SCHEDULE_HISTORY = 1000


@dataclass(slots=True)
class Delivery:
    """One leased message handed to a worker.

    ``envelope`` is None when the stored bytes could not be decoded; then
    ``decode_error`` says why and the worker dead-letters it (``raw`` keeps the
    original bytes so nothing is lost). ``receipt`` is the adapter's handle for
    ack/nack/extend: it names one lease and is unique across all queues of a broker
    (the worker keys in-flight work by it). ``lease`` is the adapter's own typed
handle on the lease (e.g. ``SqliteLease(row_id, token)``), read by its settle calls.
    ``redelivered`` is False only when the adapter knows this is the message's first
    delivery (a retry's replacement and a replayed dead letter count as first); the
    worker then skips its check for an already-finished duplicate.
    """

    envelope: Envelope | None
    receipt: str
    queue: str
    raw: bytes
    lease_expires_at: float | None = None
    decode_error: str | None = None
    lease: object = None
    redelivered: bool = True


@dataclass(slots=True)
class QueueStats:
    """Counts for one queue: ready now, delayed (``notBefore`` in the future), leased, dead."""

    queue: str
    pending: int = 0
    delayed: int = 0
    in_flight: int = 0
    dead: int = 0


@dataclass(slots=True)
class DeadLetter:
    """A dead-lettered message: the original bytes, its envelope if decodable, and why.

    ``id`` is the task id when the bytes are readable, else an adapter-chosen id.
    """

    id: str
    queue: str
    raw: bytes
    reason: str
    dead_at: float
    envelope: Envelope | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Stores keep one reason text, "<code>: <error>" for the codes the Dart Stem
        # pairs with an error in the dead letter's meta; read back as Dart shows them.
        code, sep, error = self.reason.partition(": ")
        if sep and code in DEAD_LETTER_CODES_WITH_ERROR and "error" not in self.meta:
            self.reason = code
            self.meta = {**self.meta, "error": error}


#: Dead-letter reasons stored as ``"<code>: <error>"`` and read back as ``reason=code``
#: with ``meta["error"]`` (the Dart Stem's shape).
DEAD_LETTER_CODES_WITH_ERROR = frozenset({"max-retries-exhausted", "signature-invalid"})


@runtime_checkable
class Broker(Protocol):
    """Moves envelopes from producers to workers with leases (at-least-once)."""

    #: Lease length for envelopes that carry no ``visibility_timeout``.
    default_visibility_timeout: float

    async def ping(self) -> None:
        """Check the backing store is reachable; raise ServiceUnavailableError saying what to fix."""
        ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store envelopes; ones with a future ``not_before`` become visible only then."""
        ...

    async def publish_raw(self, queue: str, raw: bytes, *, priority: int = 0) -> None:
        """Store bytes as-is (interop with other producers; malformed input in tests).

        A readable ``notBefore`` in the bytes is honoured like ``publish`` does.
        """
        ...

    async def fetch(
        self, queues: Sequence[str], max_count: int, *, block: float, consumer: str
    ) -> list[Delivery]:
        """Lease up to ``max_count`` ready envelopes from ``queues``.

        Queue order first: an earlier queue's envelopes before a later queue's, and
        higher ``priority`` first within a queue; no queue with ready work is starved
        forever (every few fetches start at a later queue). Each delivery is
        leased for the envelope's ``visibility_timeout`` (else the default); an
        unacked lease that expires makes the envelope visible again. Waits up to
        ``block`` seconds when nothing is ready, returning early when work arrives.
        A fetch that is cancelled holds nothing once it has ended: what the store
        leased for it meanwhile is given back (as by ``nack``) before the
        CancelledError propagates. During an outage an adapter retries within
        ``block`` and then raises ServiceUnavailableError; the worker backs off and
        calls again.
        """
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove delivered envelopes for good.

        Like every settle call (nack, retry, dead_letter, extend_lease), this acts only
        while the delivery still holds its lease: once another consumer has leased the
        message again, the stale receipt is ignored silently (at-least-once, never lost).
        """
        ...

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        """Give leases back so the envelopes are visible again at once (unchanged)."""
        ...

    async def retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Ack each delivery and publish its replacement envelope (atomically where possible)."""
        ...

    async def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Move deliveries to their queue's dead-letter store with a reason."""
        ...

    async def extend_lease(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Set each delivery's lease deadline to ``now + seconds`` (and ``lease_expires_at``)."""
        ...

    async def stats(self, queue: str) -> QueueStats:
        """Queue depth, delayed, in-flight and dead-letter counts."""
        ...

    async def purge(self, queue: str) -> int:
        """Drop every ready and delayed envelope of ``queue``; return how many."""
        ...

    async def delete(self, queue: str, task_ids: Sequence[str]) -> int:
        """Drop the waiting (ready or delayed) envelopes of ``queue`` whose task id is
        one of ``task_ids``; leased ones stay (revoke those). Return how many."""
        ...

    async def dead_letters(self, queue: str, limit: int = 100, *, offset: int = 0,
                           since: float | None = None) -> list[DeadLetter]:
        """List dead letters of ``queue``, oldest first: at most ``limit``, after skipping
        ``offset``, only those dead-lettered at or after ``since`` (epoch seconds)."""
        ...

    async def get_dead_letter(self, queue: str, dead_letter_id: str) -> DeadLetter | None:
        """The dead letter of ``queue`` with this :attr:`DeadLetter.id` (the newest, if a
        task id was dead-lettered more than once), or None."""
        ...

    async def replay_dead_letters(
        self,
        queue: str,
        limit: int | None = None,
        *,
        ids: Sequence[str] | None = None,
        since: float | None = None,
        delay: float | None = None,
    ) -> int:
        """Re-publish dead letters of ``queue``, oldest first; return how many.

        Only those whose id is in ``ids`` (when given) and that were dead-lettered at or
        after ``since`` (epoch seconds), at most ``limit``. Each is taken out of the dead
        letters and published again with attempt 0 (a fresh run with the whole retry
        budget), due now or ``delay`` seconds from now. Undecodable dead letters stay
        where they are; a replayed one is a first delivery.
        """
        ...

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead letter of ``queue``; return how many."""
        ...

    async def close(self) -> None:
        """Release connections; a fetch blocked at the time returns (empty) promptly."""
        ...


@runtime_checkable
class ResultBackend(Protocol):
    """Stores one :class:`TaskStatus` per task id, each with a TTL."""

    #: TTL applied when ``set_many`` gets ``None``.
    default_ttl: float

    async def ping(self) -> None:
        """Check the backing store is reachable; raise ServiceUnavailableError saying what to fix."""
        ...

    async def set_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> None:
        """Write statuses, each with its TTL in seconds (None: ``default_ttl``)."""
        ...

    async def add_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> set[str]:
        """Write each status only where its id has none yet (or only an expired one);
        return the ids written.

        Atomic per id (``SET NX``, ``INSERT ... ON CONFLICT DO NOTHING``): of two
        producers adding the same id at once exactly one gets it back. The producer
        writes a task's ``queued`` status this way before publishing it, which makes an
        explicit ``task_id`` an idempotency key.
        """
        ...

    async def forget_many(self, task_ids: Sequence[str]) -> None:
        """Delete the statuses of ``task_ids`` (unknown ids are ignored)."""
        ...

    async def get(self, task_id: str) -> TaskStatus | None:
        """The stored status, or None if unknown or expired."""
        ...

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        """Statuses of the ids that exist (missing ids are left out)."""
        ...

    async def append_meta(self, task_id: str, key: str, item: dict[str, Any], *,
                          max_items: int = 100) -> bool:
        """Append ``item`` to the JSON list at ``meta[key]`` of the stored status, in one
        atomic step; False (nothing written) when there is no unexpired status.

        Everything else stays as stored: the state, payload, error, the other meta keys
        and the TTL. The list keeps the newest ``max_items`` (at least 1); a value at
        ``meta[key]`` that is not a list is replaced. Atomic against every other write
        of the same status (``set_many`` by a worker, another ``append_meta``): an
        append never brings back an older state, and concurrent appends are all kept.
        The producer records deduplicated unique calls this way
        (``stem.unique.duplicates``).
        """
        ...

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus | None:
        """Return once the status is terminal (or None when ``timeout`` passes first).

        Adapters are notified of changes (pub/sub, LISTEN/NOTIFY, events) rather than
        polling in a tight loop.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class LockStore(Protocol):
    """Leased locks with an owner: the beat's "only one instance dispatches this entry"
    and task uniqueness.

    A lock is held by ``owner`` until ``ttl`` seconds pass or the owner releases it;
    a holder that dies is replaced once its lease runs out. Every operation is one
    atomic step in the store (``SET NX PX`` and compare-owner scripts on Redis, one
    conditional statement on SQL): no read-then-write.
    """

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take ``key`` for ``owner`` for ``ttl`` seconds if it is free or expired (or
        already ``owner``'s, which extends it); True when ``owner`` holds it now."""
        ...

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s unexpired lock to ``ttl`` seconds from now; False if
        ``owner`` does not hold it (it expired, or another owner took it)."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Free ``key`` if ``owner`` holds it; False otherwise (nothing changes)."""
        ...

    async def owner_of(self, key: str) -> str | None:
        """Who holds ``key`` now (None when free or expired)."""
        ...

    async def close(self) -> None:
        """Release connections this part owns (a store's shared ones close with it)."""
        ...


@runtime_checkable
class ScheduleStore(Protocol):
    """Keeps :class:`~stem.beat.ScheduleEntry` records and their bounded run history.

    Writes are optimistic: every write bumps ``version``, and a write that names the
    version it read fails with :class:`~stem.errors.ScheduleConflictError` if another
    writer got there first. Next-run times are computed by the beat and only stored
    here, so every store follows the same schedule rules.

    Times come back as aware UTC datetimes, kept to the millisecond (the Dart JSON's
    precision, so every store returns the same values).
    """

    #: Runs kept per entry (the oldest are dropped by the write that adds one more);
    #: :data:`DEFAULT_SCHEDULE_HISTORY` unless the store was built with another bound.
    history_max: int

    async def get(self, entry_id: str) -> ScheduleEntry | None:
        """One entry, or None."""
        ...

    async def entries(self) -> list[ScheduleEntry]:
        """Every entry, ordered by id."""
        ...

    async def upsert(self, entry: ScheduleEntry, *, expected_version: int | None = None
                     ) -> ScheduleEntry:
        """Create or replace ``entry``; return it as stored (``version`` bumped,
        ``created_at``/``updated_at`` set). With ``expected_version`` the stored version
        must equal it (0: the entry must not exist yet), else ScheduleConflictError.

        Every field is replaced by ``entry``'s, except: ``version`` becomes the stored
        version + 1 (1 for a new entry; ``entry.version`` itself is not read),
        ``created_at`` stays what is stored (a new entry's is ``entry.created_at`` or
        now) and ``updated_at`` is now."""
        ...

    async def remove(self, entry_id: str) -> bool:
        """Delete the entry and its history; False if there was none."""
        ...

    async def due(self, now: datetime, limit: int = 100) -> list[ScheduleEntry]:
        """Enabled entries with ``next_run_at <= now``, soonest first, at most ``limit``."""
        ...

    async def mark_run(self, run: ScheduleRun, *, expected_version: int,
                       next_run_at: datetime | None, jitter_ms: int = 0,
                       disable: bool = False) -> ScheduleEntry | None:
        """Record a dispatch of ``run.entry_id`` atomically, if its version is still
        ``expected_version``: ``last_run_at = run.executed_at``, the next run (None
        with ``disable``), counters, ``last_error``/``last_success_at``/``last_error_at``,
        ``drift_ms = executed_at - scheduled_at``, ``last_jitter_ms``, ``version + 1``,
        and the run appended to the bounded history. Returns the entry as stored, or
        None when the version moved on (someone else changed the entry meanwhile) or
        the entry is gone.

        Counters: ``total_run_count + 1``. A successful run sets ``last_success_at``
        and clears ``last_error``; a failed one sets ``last_error = run.error`` and
        ``last_error_at``. ``disable`` also sets ``enabled = False``; ``updated_at``
        is the time of the write."""
        ...

    async def mark_runs(self, runs: Sequence[MarkRun]) -> list[ScheduleEntry | None]:
        """:meth:`mark_run` for each of ``runs`` (distinct entries; a repeated entry id is
        a ValueError), in one round trip for the whole batch (one statement, script,
        transaction or file write). Each entry is checked and written as by
        :meth:`mark_run`: a stale version or a missing entry gives None in its place
        and changes nothing, without affecting the other runs of the batch. Returns the
        results in the order of ``runs``; an empty batch does nothing."""
        ...

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The entry's latest runs, newest first (at most ``limit``)."""
        ...

    async def close(self) -> None:
        """Release connections this part owns."""
        ...


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """What a :class:`RateLimiter` answered.

    ``allowed``: go ahead now. Otherwise ``retry_after`` is how many seconds to wait:
    with ``reserved`` the request was counted against the limit for a slot that far
    ahead (the caller goes ahead then, without asking again); without it nothing was
    counted and the caller asks again after ``retry_after``.
    """

    allowed: bool
    retry_after: float = 0.0
    reserved: bool = False


@runtime_checkable
class RateLimiter(Protocol):
    """At most ``limit`` acquisitions of a key per ``period`` seconds, across every
    process using the store (see :mod:`stem.ratelimit` for the algorithm).

    Each acquisition is one atomic step in the store, timed by the store's clock where
    it has one (Redis, Postgres), so workers with skewed clocks still share one limit.
    Keys are namespaced by the store.
    """

    async def acquire(self, key: str, limit: int, period: float, *, max_wait: float = 0.0
                      ) -> RateLimitDecision:
        """Take one token of ``key`` (``limit`` per ``period`` seconds, ``limit`` >= 1).

        Allowed when a token is free now. Otherwise, when the next free slot is at most
        ``max_wait`` seconds away, it is reserved for this caller (``reserved``,
        ``retry_after`` = seconds until it); else nothing changes and ``retry_after``
        says when asking again can succeed."""
        ...

    async def acquire_many(self, key: str, limit: int, period: float, count: int, *,
                           max_wait: float = 0.0) -> list[RateLimitDecision]:
        """``count`` acquisitions of ``key`` in one atomic step (one round trip): the
        decisions of ``count`` calls of :meth:`acquire` made one after another at one
        instant, in order. How a worker asks for all the deliveries it starts at once."""
        ...

    async def close(self) -> None:
        """Release connections this part owns (a store's shared ones close with it)."""
        ...


@runtime_checkable
class RevokeStore(Protocol):
    """Keeps :class:`~stem.revoke.RevokeEntry` records: the tasks workers must not run
    (or must stop), and the paused queues, of the store's namespace.

    ``upsert_many`` keeps, per task id, the entry with the higher ``version``: one
    atomic step in the store (a Lua script, one conditional statement, one locked file
    rewrite), so two writers never lose the newer entry. ``changed_since`` is the
    cheap query a worker repeats to learn of new entries.
    """

    async def upsert_many(self, entries: Sequence[RevokeEntry]) -> None:
        """Store ``entries``; for a task id already stored the higher version wins
        (a lower or equal one changes nothing)."""
        ...

    async def entries(self) -> list[RevokeEntry]:
        """Every stored entry (expired ones included until pruned), by version."""
        ...

    async def changed_since(self, version: int) -> list[RevokeEntry]:
        """The entries whose version is above ``version``, by version."""
        ...

    async def prune_expired(self, now: datetime | None = None) -> int:
        """Delete the entries expired at ``now`` (default: now); return how many."""
        ...

    async def close(self) -> None:
        """Release connections this part owns (a store's shared ones close with it)."""
        ...


@runtime_checkable
class GroupStore(Protocol):
    """Group, chord and batch records: expected count, members' outcomes, the chord claim.

    Every operation is one atomic step in the store (a Lua script on Redis, one
    statement on Postgres, one write transaction on SQLite, a lock in memory), so
    members finishing at once on different workers, and members redelivered after a
    crash, are counted once and a chord's callback is claimed once. Records expire
    ``ttl`` seconds after :meth:`create`; an expired group is gone for every call.
    """

    async def create(self, group_id: str, expected: int, meta: dict[str, Any],
                     ttl: float) -> bool:
        """Create the record if ``group_id`` has none; False (nothing changes) if it has."""
        ...

    async def add_result(self, group_id: str, member: GroupMember) -> GroupProgress | None:
        """Record ``member``'s outcome under its index unless that index has one (the
        first record wins); return the counters after the call, or None when the group
        does not exist (never created, or expired)."""
        ...

    async def claim_callback(self, group_id: str) -> bool:
        """Mark the group's callback as dispatched: True for exactly one caller, and
        only once every member succeeded (completion check and claim in one step)."""
        ...

    async def get(self, group_id: str) -> GroupRecord | None:
        """The record with its members in index order, or None."""
        ...

    async def close(self) -> None:
        """Release connections this part owns (a store's shared ones close with it)."""
        ...


@runtime_checkable
class ControlChannel(Protocol):
    """A fan-out log of control messages (commands to workers and their replies).

    Every reader sees every message published after the position it started from
    (:meth:`position`), whoever else reads: real fan-out, unlike a queue. Messages are
    small JSON documents kept for a short while (minutes) and trimmed after that.
    """

    async def position(self) -> str:
        """The end of the log now: read from here to see only what comes next."""
        ...

    async def publish(self, message: bytes) -> None:
        """Append ``message`` for every reader."""
        ...

    async def read(self, after: str, timeout: float) -> tuple[str, list[bytes]]:
        """The messages after position ``after`` (waiting up to ``timeout`` seconds for
        one when there are none yet) and the position after them."""
        ...

    async def close(self) -> None:
        """Release connections this part owns (a store's shared ones close with it)."""
        ...


@runtime_checkable
class HeartbeatStore(Protocol):
    """The latest heartbeat of each live worker (a JSON object with ``workerId``), kept
    for ``ttl`` seconds after it was written."""

    async def put(self, worker_id: str, heartbeat: bytes, ttl: float) -> None:
        """Store ``worker_id``'s latest heartbeat (replacing the previous one)."""
        ...

    async def current(self) -> list[bytes]:
        """The heartbeats not older than their ``ttl``."""
        ...

    async def remove(self, worker_id: str) -> None:
        """Forget ``worker_id`` (it stopped)."""
        ...

    async def close(self) -> None:
        """Release connections this part owns."""
        ...


@runtime_checkable
class TransactionalPublisher(Protocol):
    """A broker that can publish through the caller's own database connection.

    ``app.enqueue(..., connection=conn)`` uses it so a task exists only if the
    caller's transaction commits (the outbox pattern without an outbox).
    """

    async def publish_with_connection(self, connection: Any, envelopes: Sequence[Envelope]
                                      ) -> None:
        """Insert ``envelopes`` inside ``connection``'s current transaction."""
        ...


@runtime_checkable
class Store(Protocol):
    """Everything Stem keeps at one URL, over one set of connections.

    A store owns the connections for its URL (one Postgres pool and one LISTEN
    connection, one Redis client and pub/sub connection, one SQLite database handle)
    and hands out the stores built on them: :attr:`broker`, :attr:`backend`,
    :attr:`locks` and :attr:`schedules`. ``Stem`` asks
    :func:`stem.adapters.store_from_url` for one store per distinct URL, so a broker and
    a backend on the same URL share it. Nothing connects until first use;
    ``async with store:`` closes it on exit.
    """

    #: The URL this store was built from (may hold a password: show it masked).
    url: str

    @property
    def broker(self) -> Broker:
        """The broker on this store's connections."""
        ...

    @property
    def backend(self) -> ResultBackend:
        """The result backend on this store's connections."""
        ...

    @property
    def locks(self) -> LockStore:
        """The lock store on this store's connections (the beat's entry locks)."""
        ...

    @property
    def schedules(self) -> ScheduleStore:
        """The schedule store on this store's connections (the beat's entries)."""
        ...

    async def ping(self) -> None:
        """Check the store is reachable; raise ServiceUnavailableError saying what to fix."""
        ...

    async def migrate(self) -> list[int]:
        """Create or upgrade the store's schema now; return the migrations applied."""
        ...

    async def close(self) -> None:
        """Close every connection the store opened (a later use reopens them)."""
        ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...


@runtime_checkable
class AtomicPublishStore(Protocol):
    """A store that can write ``queued`` statuses and publish in one transaction.

    The producer uses it when its broker and backend come from the same store: a task
    is published exactly when its status is new, and a crash cannot leave a status
    without its message (or the other way round).
    """

    async def publish_new(
        self,
        items: Sequence[tuple[Envelope, TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
        locks: Mapping[str, tuple[str, float]] | None = None,
    ) -> set[str]:
        """For each envelope whose id has no status yet: write its status (with its TTL,
        None meaning ``default_ttl``) and publish it, atomically. Return the ids published;
        the others were already known and are left as they are.

        ``locks`` (task id -> (lock key, seconds)) makes those envelopes unique tasks:
        each is published only if it also takes its lock in this store's
        :class:`LockStore`, owned by its id (free, expired, or already its own), in the
        same atomic step; otherwise nothing of it is written."""
        ...


@runtime_checkable
class AtomicAckStore(Protocol):
    """A store that can write results and ack deliveries in one transaction.

    The worker's completer uses it when its broker and backend come from the same
    store: a result and its ack cannot be split by a crash, and a batch costs one
    round-trip instead of two.
    """

    async def ack_with_results(
        self,
        deliveries: Sequence[Delivery],
        statuses: Sequence[tuple[TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
    ) -> None:
        """Write ``statuses`` and ack ``deliveries`` atomically."""
        ...
