"""In-process broker: heaps and dicts behind one lock, woken by futures.

Lease semantics: every fetch gives the message a fresh lease number; the delivery's
``lease`` is ``MemoryLease(message id, lease number)`` and its ``receipt`` the same
as ``"<message id>:<lease>"``. ``ack``, ``nack``, ``retry``,
``dead_letter`` and ``extend_lease`` act only while that lease is the message's
current one; once a lease has expired *and* another consumer has leased the message
again, the old receipt is stale and every call with it is silently ignored (so a slow
worker cannot ack or dead-letter the delivery another worker now owns). A lease that
expired but was not re-leased yet is still honoured.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from stem._time import now_epoch
from stem.adapters._leasing import Claim, LeasingBroker, delivery
from stem.adapters._shared import Waiter, decode_stored, lease_seconds, replayed
from stem.envelope import Envelope, peek_task_id
from stem.limits import clamp_priority
from stem.ports import DEFAULT_VISIBILITY_TIMEOUT, DeadLetter, Delivery, QueueStats


@dataclass(slots=True, eq=False)
class _Message:
    mid: int
    raw: bytes
    priority: int
    vt: float | None
    lease: int = 0
    deadline: float = 0.0
    deliveries: int = 0


@dataclass(slots=True, eq=False)
class _DeadEntry:
    mid: int
    raw: bytes
    priority: int
    reason: str
    dead_at: float


@dataclass(slots=True, eq=False)
class _Queue:
    msgs: dict[int, _Message] = field(default_factory=dict)
    # (-priority, message id): message ids grow with publish order, so FIFO per priority.
    ready: list[tuple[int, int]] = field(default_factory=list)
    # (due epoch, message id)
    delayed: list[tuple[float, int]] = field(default_factory=list)
    leased: dict[int, _Message] = field(default_factory=dict)
    # (deadline, message id, lease); stale entries (extended or finished leases) are
    # skipped when popped instead of being searched for and removed.
    expiry: list[tuple[float, int, int]] = field(default_factory=list)
    dead: deque[_DeadEntry] = field(default_factory=deque)
    waiters: set[Waiter] = field(default_factory=set)


class MemoryLease(NamedTuple):
    """A memory delivery's lease: the message and its lease number at fetch."""

    message_id: int
    lease: int


class _Wakeup:
    """A fetch's wake-up: a :class:`Waiter` registered on its queues."""

    __slots__ = ("_broker", "_queues", "_waiter")

    def __init__(self, broker: MemoryBroker, queues: list[str]) -> None:
        self._broker = broker
        self._queues = queues
        self._waiter: Waiter | None = None

    def arm(self) -> None:
        self.close()
        waiter = self._waiter = Waiter()
        with self._broker._lock:
            for name in self._queues:
                self._broker._queue(name).waiters.add(waiter)

    async def wait(self, seconds: float) -> bool:
        return self._waiter is not None and await self._waiter.wait(seconds)

    def close(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with self._broker._lock:
                for name in self._queues:
                    self._broker._queue(name).waiters.discard(waiter)


class MemoryBroker(LeasingBroker):
    """A :class:`stem.ports.Broker` for one process (tests, ``stem.testing``, demos).

    Envelopes are stored as their JSON bytes, exactly as a real broker stores them,
    so arguments that would not survive Redis or Postgres fail here too and every
    delivery is a fresh object. Thread-safe; usable from several event loops.
    """

    kind = "memory"
    lease_type = MemoryLease

    def __init__(
        self, name: str = "default", *, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    ) -> None:
        super().__init__()
        self.name = name
        self.default_visibility_timeout = visibility_timeout
        self._lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._ids = itertools.count(1)
        self._leases = itertools.count(1)

    def __repr__(self) -> str:
        return f"MemoryBroker({self.name!r})"

    # -- internals (call with the lock held) ------------------------------------

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    def _put(
        self, q: _Queue, raw: bytes, priority: int, due: float | None, vt: float | None, now: float
    ) -> None:
        # The stored priority and lease length are bounded (the bytes stay as given).
        priority = clamp_priority(priority)
        mid = next(self._ids)
        q.msgs[mid] = _Message(mid, raw, priority, lease_seconds(vt))
        if due is not None and due > now:
            heapq.heappush(q.delayed, (due, mid))
        else:
            heapq.heappush(q.ready, (-priority, mid))

    def _refresh(self, q: _Queue, now: float) -> None:
        """Make due delayed messages and expired leases ready."""
        while q.delayed and q.delayed[0][0] <= now:
            _, mid = heapq.heappop(q.delayed)
            heapq.heappush(q.ready, (-q.msgs[mid].priority, mid))
        while q.expiry and q.expiry[0][0] <= now:
            _, mid, lease = heapq.heappop(q.expiry)
            m = q.leased.get(mid)
            if m is None or m.lease != lease or m.deadline > now:
                continue
            del q.leased[mid]
            m.lease = 0
            heapq.heappush(q.ready, (-m.priority, mid))

    def _holder(self, d: Delivery) -> tuple[_Queue, _Message] | None:
        """The queue and message if ``d`` still holds the message's current lease."""
        lease = d.lease
        q = self._queues.get(d.queue)
        if not isinstance(lease, MemoryLease) or q is None:
            return None
        m = q.leased.get(lease.message_id)
        if m is None or m.lease != lease.lease:
            return None
        return q, m

    def _release(self, q: _Queue, m: _Message) -> None:
        del q.leased[m.mid]
        m.lease = 0

    def _finish(self, q: _Queue, m: _Message) -> None:
        del q.leased[m.mid]
        del q.msgs[m.mid]
        m.lease = 0

    def _take(self, queues: Sequence[str], max_count: int, now: float
              ) -> list[tuple[str, _Message]]:
        taken: list[tuple[str, _Message]] = []
        for name in queues:
            q = self._queues.get(name)
            if q is None:
                continue
            self._refresh(q, now)
            while q.ready and len(taken) < max_count:
                _, mid = heapq.heappop(q.ready)
                m = q.msgs[mid]
                m.lease = next(self._leases)
                m.deliveries += 1
                m.deadline = now + (m.vt if m.vt is not None else self.default_visibility_timeout)
                q.leased[mid] = m
                heapq.heappush(q.expiry, (m.deadline, mid, m.lease))
                taken.append((name, m))
            if len(taken) >= max_count:
                break
        return taken

    def _next_change(self, queues: Sequence[str]) -> float | None:
        """Earliest time a delayed message or a lease in ``queues`` comes due."""
        times = []
        for name in queues:
            q = self._queues.get(name)
            if q is None:
                continue
            if q.delayed:
                times.append(q.delayed[0][0])
            if q.expiry:
                times.append(q.expiry[0][0])
        return min(times) if times else None

    @staticmethod
    def _wake(waiters: list[Waiter]) -> None:
        for w in waiters:
            w.wake()

    # -- Broker -----------------------------------------------------------------

    async def ping(self) -> None:
        """Always reachable."""

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        # All or none: every one is encoded before any is stored.
        encoded = [(e, e.to_json()) for e in envelopes]
        now = now_epoch()
        woken: list[Waiter] = []
        with self._lock:
            for env, raw in encoded:
                q = self._queue(env.queue)
                self._put(q, raw, env.priority, env.not_before_epoch, env.visibility_timeout, now)
                woken.extend(q.waiters)
                q.waiters.clear()
        self._wake(woken)

    async def publish_raw(self, queue: str, raw: bytes, *, priority: int = 0) -> None:
        """Store bytes as-is; a decodable ``notBefore``/``visibilityTimeout`` is honoured
        (the lease length within the limits of :mod:`stem.limits`)."""
        env, _ = decode_stored(raw)
        now = now_epoch()
        with self._lock:
            q = self._queue(queue)
            self._put(
                q,
                bytes(raw),
                priority,
                None if env is None else env.not_before_epoch,
                None if env is None else env.visibility_timeout,
                now,
            )
            woken = list(q.waiters)
            q.waiters.clear()
        self._wake(woken)

    async def _watch(self, queues: list[str], consumer: str, block: float) -> _Wakeup:
        return _Wakeup(self, queues)

    async def _claim(self, queues: list[str], max_count: int, consumer: str, polled: bool
                     ) -> Claim:
        now = now_epoch()
        with self._lock:
            taken = self._take(queues, max_count, now)
            due = None if taken else self._next_change(queues)
        if not taken:
            return Claim([], None if due is None else max(0.0, due - now))
        return Claim([
            delivery(name, m.raw, f"{m.mid}:{m.lease}", MemoryLease(m.mid, m.lease), m.deadline,
                     m.deliveries > 1)
            for name, m in taken
        ])

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for d in deliveries:
                held = self._holder(d)
                if held is not None:
                    self._finish(*held)

    async def _nack(self, deliveries: Sequence[Delivery]) -> None:
        # They keep their place in line.
        woken: list[Waiter] = []
        with self._lock:
            for d in deliveries:
                held = self._holder(d)
                if held is None:
                    continue
                q, m = held
                self._release(q, m)
                heapq.heappush(q.ready, (-m.priority, m.mid))
                woken.extend(q.waiters)
                q.waiters.clear()
        self._wake(woken)

    async def _retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        # Atomically: under the one lock.
        encoded = [(d, e, e.to_json()) for d, e in items]
        now = now_epoch()
        woken: list[Waiter] = []
        with self._lock:
            for d, env, raw in encoded:
                held = self._holder(d)
                if held is None:
                    continue
                self._finish(*held)
                q = self._queue(env.queue)
                self._put(q, raw, env.priority, env.not_before_epoch, env.visibility_timeout, now)
                woken.extend(q.waiters)
                q.waiters.clear()
        self._wake(woken)

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        now = now_epoch()
        with self._lock:
            for d, reason in items:
                held = self._holder(d)
                if held is None:
                    continue
                q, m = held
                self._finish(q, m)
                q.dead.append(_DeadEntry(m.mid, m.raw, m.priority, reason, now))

    async def _extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        now = now_epoch()
        with self._lock:
            for d in deliveries:
                held = self._holder(d)
                if held is None:
                    continue
                q, m = held
                m.deadline = now + seconds
                heapq.heappush(q.expiry, (m.deadline, m.mid, m.lease))
                d.lease_expires_at = m.deadline

    async def stats(self, queue: str) -> QueueStats:
        """Ready, delayed, leased and dead counts of ``queue``."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return QueueStats(queue=queue)
            self._refresh(q, now_epoch())
            return QueueStats(
                queue=queue,
                pending=len(q.ready),
                delayed=len(q.delayed),
                in_flight=len(q.leased),
                dead=len(q.dead),
            )

    async def purge(self, queue: str) -> int:
        """Drop ready and delayed messages (expired leases count as ready); leased ones stay."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            self._refresh(q, now_epoch())
            dropped = len(q.ready) + len(q.delayed)
            q.msgs = dict(q.leased)
            q.ready.clear()
            q.delayed.clear()
            return dropped

    async def dead_letters(self, queue: str, limit: int = 100, *, offset: int = 0,
                           since: float | None = None) -> list[DeadLetter]:
        """Dead letters of ``queue``, oldest first (see :class:`stem.ports.Broker`)."""
        with self._lock:
            q = self._queues.get(queue)
            entries = [] if q is None else [
                e for e in q.dead if since is None or e.dead_at >= since]
        return [_dead_letter(queue, e) for e in entries[max(0, offset):][:max(0, limit)]]

    async def get_dead_letter(self, queue: str, dead_letter_id: str) -> DeadLetter | None:
        """The newest dead letter of ``queue`` with this id, or None."""
        with self._lock:
            q = self._queues.get(queue)
            entries = [] if q is None else list(q.dead)
        for e in reversed(entries):
            letter = _dead_letter(queue, e)
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

        Undecodable ones stay in the dead-letter store: publishing the same bad bytes
        again could only dead-letter them again.
        """
        now = now_epoch()
        wanted = None if ids is None else set(ids)
        count = 0
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            kept: deque[_DeadEntry] = deque()
            while q.dead and (limit is None or count < limit):
                entry = q.dead.popleft()
                env, _ = decode_stored(entry.raw)
                if env is None or (since is not None and entry.dead_at < since) or (
                        wanted is not None and env.id not in wanted):
                    kept.append(entry)
                    continue
                fresh = replayed(env, delay)
                self._put(q, fresh.to_json(), fresh.priority, fresh.not_before_epoch,
                          fresh.visibility_timeout, now)
                count += 1
            kept.extend(q.dead)
            q.dead = kept
            woken = list(q.waiters)
            q.waiters.clear()
        self._wake(woken)
        return count

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead letter of ``queue``."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            n = len(q.dead)
            q.dead.clear()
            return n

    async def _interrupt(self) -> None:
        with self._lock:
            woken = [w for q in self._queues.values() for w in q.waiters]
        self._wake(woken)

    # close: nothing to release, the data lives as long as the process (memory://NAME).


def _dead_letter(queue: str, e: _DeadEntry) -> DeadLetter:
    env, _ = decode_stored(e.raw)
    if env is not None:
        dl_id = env.id
    else:
        dl_id = peek_task_id(e.raw) or f"dl-{e.mid}"
    return DeadLetter(
        id=dl_id, queue=queue, raw=e.raw, reason=e.reason, dead_at=e.dead_at, envelope=env
    )
