"""Redis Streams broker.

Layout: every queue has one stream per priority band (0..9) read by one consumer
group, a delayed ZSET, a dead-letter stream and a little bookkeeping, all under the
hash tag ``{<namespace>:<queue>}`` so each Lua script stays in one slot (see
:mod:`stem.adapters.redis.scripts` for the keys and the lease/ownership rules).

Round trips: ``publish`` and the settle calls (``ack``, ``retry``, ...) are one
script call per queue (a plain XADD/ZADD for a single envelope), concurrent when a
batch spans queues; ``fetch`` is one script per queue while work is ready, and a
single ``XREADGROUP ... BLOCK`` across every band of every queue when it is not (per
queue, concurrently, on Redis Cluster).

A delivery's ``lease`` is a :class:`RedisLease`; its ``item`` is the compact
``b"<band> <entry id> <count>"`` the scripts parse, built once at fetch so settling a
batch costs the client almost nothing per delivery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import redis.exceptions as rexc

from stem._time import now_epoch
from stem.adapters._leasing import Claim, LeasingBroker, delivery
from stem.adapters._shared import (
    check_namespace,
    check_publishable,
    claim_safely,
    decode_stored,
    lease_seconds,
    replayed,
)
from stem.envelope import Envelope, peek_task_id
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.log import get_logger
from stem.ports import (
    DEFAULT_RESULT_TTL,
    DEFAULT_VISIBILITY_TIMEOUT,
    DeadLetter,
    Delivery,
    QueueStats,
)
from stem.status import TaskStatus

from . import scripts
from ._connection import (
    CONNECTION_ERRORS,
    DEFAULT_DEAD_LETTER_MAX,
    BlockingConn,
    RedisConnector,
    RedisSettings,
)

log = get_logger(__name__)

#: Consumer group name on every band stream (groups are per stream, hence per queue).
GROUP = "stem"
BANDS = 10
#: Longest single XREADGROUP BLOCK, so cross-process delayed work and the claimer
#: are looked at at least this often while idle.
DEFAULT_BLOCK_TIME = 1.0
#: How often a fetching worker reclaims expired leases of each queue it reads.
DEFAULT_CLAIM_INTERVAL = 1.0
#: Delayed entries moved per fetch script run (more are moved on the next run).
MOVER_BATCH = 512
#: On close, consumers idle this long with nothing pending are deleted too (workers
#: that crashed and never closed): one day.
FORGET_IDLE_MS = 86_400_000


def key_part(queue: str) -> str:
    """``queue`` as written inside its keys: ``%``, ``:``, ``{`` and ``}`` percent-encoded.

    Reversible, so two queue names never share keys, and a queue name cannot change
    the hash tag (``{ns:queue}``) that keeps its keys in one Cluster slot.
    """
    if "%" in queue or ":" in queue or "{" in queue or "}" in queue:
        return (queue.replace("%", "%25").replace(":", "%3A")
                .replace("{", "%7B").replace("}", "%7D"))
    return queue


class QueueKeys:
    """The Redis keys of one queue (all share the hash tag ``{ns:queue}``)."""

    __slots__ = ("claim", "dead", "delayed", "keys", "leases", "queue", "released", "streams",
                 "trimmed")

    def __init__(self, namespace: str, queue: str) -> None:
        tag = "{" + namespace + ":" + key_part(queue) + "}"
        self.queue = queue
        self.streams = [f"{tag}:stream:{band}" for band in range(BANDS)]
        self.delayed = f"{tag}:delayed"
        self.leases = f"{tag}:leases"
        self.released = f"{tag}:released"
        self.dead = f"{tag}:dead"
        self.claim = f"{tag}:claim"
        self.trimmed = f"{tag}:dead_trimmed"
        #: KEYS of every script, in the order scripts.py documents.
        self.keys = [
            *self.streams,
            self.delayed,
            self.leases,
            self.released,
            self.dead,
            self.claim,
            self.trimmed,
        ]


def band_of(priority: int) -> int:
    """Priority band (stream) of an envelope: its priority clamped to 0..9."""
    return 0 if priority <= 0 else 9 if priority >= 9 else priority


def _since_id(since: float | None) -> str:
    """The first dead-letter stream id at or after ``since`` (entry ids are epoch ms)."""
    if since is None or since <= 0:
        return "-"
    return f"{int(min(since, 9e15) * 1000)}-0"


def _vt_ms(seconds: float | None) -> int | str:
    """The stored ``v`` field: the lease length in ms, clamped (stem.limits); '' for none."""
    vt = lease_seconds(seconds)
    return "" if vt is None else round(vt * 1000)


class RedisLease(NamedTuple):
    """A Redis delivery's lease: the stream entry, the consumer holding it and its
    delivery count (what proves the lease is still this delivery's)."""

    band: int
    entry_id: bytes
    consumer: str
    delivery_count: int
    #: ``b"<band> <entry id> <count>"``, the form the scripts take.
    item: bytes


class _NoWakeup:
    """Redis waits by blocking in XREADGROUP (:meth:`RedisBroker._wait_for_work`)."""

    __slots__ = ()

    def arm(self) -> None:
        pass

    async def wait(self, seconds: float) -> bool:
        raise AssertionError("unused")

    def close(self) -> None:
        pass


_NO_WAKEUP = _NoWakeup()


@dataclass(slots=True, eq=False)
class _Reader:
    """A blocking XREADGROUP in progress (so a local publish can end it early)."""

    blocking: BlockingConn
    until: float  # epoch seconds the read would end by itself
    client_id: int | None = None
    stop: bool = False  # asked to end early (honoured once client_id is known)
    unblock_sent: bool = False


@dataclass(slots=True, eq=False)
class _Reads:
    """The blocking reads of one fetch, so a cancelled fetch can end them early."""

    readers: list[_Reader] = field(default_factory=list)
    stopped: bool = False


class RedisBroker(LeasingBroker):
    """A :class:`stem.ports.Broker` on Redis Streams (standalone, Sentinel or Cluster).

    ``default_visibility_timeout`` doubles as the *idle horizon* XAUTOCLAIM uses, so
    every worker and producer of a namespace should use the same value; envelopes
    with their own ``visibility_timeout`` and ``extend_lease`` work with any length.

    Each queue's dead-letter stream keeps about ``dead_letter_max`` entries (URL
    ``?dead_letter_max=``, default 100,000): older ones are dropped as new ones
    arrive, counted (:meth:`dead_letters_trimmed`) and logged.
    """

    kind = "redis"
    lease_type = RedisLease

    def __init__(
        self,
        settings: RedisSettings,
        *,
        namespace: str = "stem",
        block_time: float = DEFAULT_BLOCK_TIME,
        claim_interval: float = DEFAULT_CLAIM_INTERVAL,
        default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        dead_letter_max: int = DEFAULT_DEAD_LETTER_MAX,
        connector: RedisConnector | None = None,
    ) -> None:
        if isinstance(dead_letter_max, bool) or not isinstance(dead_letter_max, int) or (
            dead_letter_max < 1
        ):
            raise ConfigurationError(
                f"dead_letter_max must be a positive whole number, got {dead_letter_max!r}"
            )
        super().__init__()
        self.namespace = check_namespace(namespace)
        self.dead_letter_max = dead_letter_max
        self.block_time = block_time
        self.claim_interval = claim_interval
        self.default_visibility_timeout = default_visibility_timeout
        # A store passes the client its parts share; alone, the broker owns one.
        self._owns_conn = connector is None
        self._conn = RedisConnector(settings) if connector is None else connector
        self._keys: dict[str, QueueKeys] = {}
        self._scripts: dict[str, Any] | None = None
        self._ready_groups: set[str] = set()
        self._next_claim: dict[str, float] = {}
        self._consumers: set[str] = set()
        self._readers: set[_Reader] = set()
        # Earliest due time of delayed work this process published since the last
        # fetch script run: a blocking read must not sleep past it.
        self._due_hint: float | None = None

    def __repr__(self) -> str:
        return f"RedisBroker({self._conn.settings.safe_url!r}, namespace={self.namespace!r})"

    # -- plumbing -------------------------------------------------------------------

    def keys(self, queue: str) -> QueueKeys:
        """The keys of ``queue`` (cached)."""
        k = self._keys.get(queue)
        if k is None:
            k = self._keys[queue] = QueueKeys(self.namespace, queue)
        return k

    @property
    def _script(self) -> dict[str, Any]:
        if self._scripts is None:
            # Only hashed here; EVALSHA loads a script on NOSCRIPT.
            self._scripts = {name: self._conn.script(src) for name, src in scripts.ALL.items()}
        return self._scripts

    @property
    def _horizon_ms(self) -> int:
        horizon = lease_seconds(self.default_visibility_timeout)
        return round((DEFAULT_VISIBILITY_TIMEOUT if horizon is None else horizon) * 1000)

    async def _ensure_groups(self, queues: Iterable[str]) -> None:
        missing = [q for q in queues if q not in self._ready_groups]
        if not missing:
            return
        ensure = self._script["ensure"]
        await asyncio.gather(*(ensure(self.keys(q).keys, [GROUP]) for q in missing))
        self._ready_groups.update(missing)

    # -- Broker: publishing --------------------------------------------------------

    async def ping(self) -> None:
        """PING the server; raise ServiceUnavailableError naming the URL and what to check."""
        await self._conn.ping("Stem broker")

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        """One command for one envelope, else one script per queue (also used for
        replacements, whose leases are clamped, without the publish check).

        Ready envelopes are XADDed to their band stream, future ones ZADDed to the
        queue's delayed set. A batch goes as a single script call per queue (one
        round trip, and two arguments per envelope for the client to encode).
        """
        if len(envelopes) == 1:
            env = envelopes[0]
            await self._store_one(
                env.queue, env.to_json(), env.priority, env.visibility_timeout, env.not_before_epoch
            )
            return
        now = now_epoch()
        per_queue: dict[str, tuple[list[bytes], list[bytes]]] = {}
        soonest: float | None = None
        for env in envelopes:
            spec_raws = per_queue.get(env.queue)
            if spec_raws is None:
                spec_raws = per_queue[env.queue] = ([], [])
            vt = lease_seconds(env.visibility_timeout)
            vt_ms = b"" if vt is None else b"%d" % round(vt * 1000)
            due = env.not_before_epoch
            if due is not None and due > now:
                spec_raws[0].append(b"%d:%s:%d" % (band_of(env.priority), vt_ms, int(due * 1000)))
                soonest = due if soonest is None else min(soonest, due)
            else:
                spec_raws[0].append(b"%d:%s:" % (band_of(env.priority), vt_ms))
            spec_raws[1].append(env.to_json())
        calls = [(q, [GROUP, b",".join(specs), *raws]) for q, (specs, raws) in per_queue.items()]
        await self._settle("publish", calls, "publish")
        if soonest is not None:
            await self._delayed_published(soonest)

    async def publish_new(
        self,
        items: Sequence[tuple[Envelope, TaskStatus, float | None]],
        status_prefix: str,
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
        locks: Mapping[str, tuple[str, float]] | None = None,
    ) -> set[str]:
        """Store each envelope whose status key (``status_prefix`` + its id) can be SET NX
        to its status, atomically per queue (one script call); return the ids stored.

        For :meth:`RedisStore.publish_new`; not on Redis Cluster, where the status keys
        live in other slots than the queue's. Ids must be unique in ``items``.
        """
        if not items:
            return set()
        check_publishable([e for e, _, _ in items])
        now = now_epoch()
        if locks:
            # Unique tasks one script each (rare in bulk): the lock, status and envelope
            # in one step. The others go on as a batch.
            done: set[str] = set()
            for item in items:
                if item[0].id in locks:
                    done |= await self._publish_new_one(
                        item, status_prefix + item[0].id, default_ttl, now,
                        locks[item[0].id])
            rest = [i for i in items if i[0].id not in locks]
            return done | await self.publish_new(rest, status_prefix, default_ttl=default_ttl)
        if len(items) == 1:
            return await self._publish_new_one(items[0], status_prefix + items[0][0].id,
                                               default_ttl, now)
        per_queue: dict[str, tuple[list[bytes], list[bytes], list[tuple[str, float | None]]]] = {}
        for env, status, ttl in items:
            q = per_queue.get(env.queue)
            if q is None:
                q = per_queue[env.queue] = ([], [], [])
            vt = lease_seconds(env.visibility_timeout)
            vt_ms = b"" if vt is None else b"%d" % round(vt * 1000)
            due = env.not_before_epoch
            ttl_ms = max(1, round((default_ttl if ttl is None else ttl) * 1000))
            task_id = env.id.encode()
            if b"%" in task_id or b"," in task_id:
                task_id = task_id.replace(b"%", b"%25").replace(b",", b"%2C")
            if due is not None and due > now:
                q[0].append(b"%d:%s:%d:%d:%s" % (band_of(env.priority), vt_ms, int(due * 1000),
                                                 ttl_ms, task_id))
            else:
                due = None
                q[0].append(b"%d:%s::%d:%s" % (band_of(env.priority), vt_ms, ttl_ms, task_id))
            q[1].extend((env.to_json(), status.to_json()))
            q[2].append((env.id, due))
        script: Any = self._script["publish_new"]
        queues = list(per_queue)
        calls = [script(self.keys(name).keys,
                        [GROUP, status_prefix, b",".join(per_queue[name][0]), *per_queue[name][1]])
                 for name in queues]
        try:
            # One queue (the common case) is awaited directly: gather would wrap it in a
            # task, which costs more than the call itself.
            replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker publish") from exc
        stored: set[str] = set()
        soonest: float | None = None
        for name, reply in zip(queues, replies, strict=True):
            ids = per_queue[name][2]
            for pos in reply:
                stored_id, stored_due = ids[int(pos) - 1]
                stored.add(stored_id)
                if stored_due is not None:
                    soonest = stored_due if soonest is None else min(soonest, stored_due)
        if soonest is not None:
            await self._delayed_published(soonest)
        return stored

    async def _publish_new_one(self, item: tuple[Envelope, TaskStatus, float | None],
                               status_key: str, default_ttl: float, now: float,
                               lock: tuple[str, float] | None = None) -> set[str]:
        """One envelope; with ``lock`` (Redis key, seconds) only if that lock is free,
        expired or already this task's (a unique task), taking it in the same script."""
        env, status, ttl = item
        k = self._keys.get(env.queue) or self.keys(env.queue)
        band = band_of(env.priority)
        vt = lease_seconds(env.visibility_timeout)
        due = env.not_before_epoch
        delayed = due is not None and due > now
        ttl_ms = max(1, round((default_ttl if ttl is None else ttl) * 1000))
        script: Any = self._script["publish_new_one"]
        keys = [status_key, k.delayed if delayed else k.streams[band]]
        args: list[Any] = [status.to_json(), ttl_ms, env.to_json(),
                           b"" if vt is None else b"%d" % round(vt * 1000),
                           int(due * 1000) if delayed and due is not None else b"", band]
        if lock is not None:
            keys.append(lock[0])
            args += (env.id, max(1, round(lock[1] * 1000)))
        try:
            stored = await script(keys, args)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker publish") from exc
        if stored != 1:
            return set()
        if delayed and due is not None:
            await self._delayed_published(due)
        return {env.id}

    async def publish_raw(self, queue: str, raw: bytes, *, priority: int = 0) -> None:
        """Store bytes as-is; a decodable ``notBefore``/``visibilityTimeout`` is honoured
        (the stored lease length clamped, like the priority, to :mod:`stem.limits`)."""
        env, _ = decode_stored(raw)
        vt = None if env is None else env.visibility_timeout
        due = None if env is None else env.not_before_epoch
        await self._store_one(queue, bytes(raw), priority, vt, due)

    async def _store_one(
        self, queue: str, raw: bytes, priority: int, vt: float | None, due: float | None
    ) -> None:
        """One envelope, one plain command (cheaper than a script for a single XADD)."""
        k = self._keys.get(queue) or self.keys(queue)
        band = band_of(priority)
        delayed = due is not None and due > now_epoch()
        if delayed:
            assert due is not None
            member = b"%d:%s:%s" % (band, str(_vt_ms(vt)).encode(), raw)
            cmd: tuple[Any, ...] = ("ZADD", k.delayed, int(due * 1000), member)
        elif vt is None:
            cmd = ("XADD", k.streams[band], "*", "p", raw)
        else:
            cmd = ("XADD", k.streams[band], "*", "p", raw, "v", _vt_ms(vt))
        try:
            await self._conn.client.execute_command(*cmd)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker publish") from exc
        if delayed:
            assert due is not None
            await self._delayed_published(due)

    async def _delayed_published(self, due: float) -> None:
        """Delayed work due at ``due`` was stored: wake blocked reads that would oversleep it."""
        self._due_hint = due if self._due_hint is None else min(self._due_hint, due)
        for reader in list(self._readers):
            if reader.until > due + 0.002:
                await self._unblock(reader)

    async def _unblock(self, reader: _Reader) -> None:
        reader.stop = True
        if reader.client_id is None or reader.unblock_sent:
            return  # _block_read sends it as soon as it knows the client id
        reader.unblock_sent = True
        try:
            await self._conn.unblock(reader.blocking, reader.client_id)
        except (rexc.RedisError, OSError) as exc:
            # The read then simply runs to its own (short) timeout.
            log.debug("redis.broker.unblock_failed", error=repr(exc))

    # -- Broker: fetching ----------------------------------------------------------

    async def _watch(self, queues: list[str], consumer: str, block: float) -> _NoWakeup:
        self._consumers.add(consumer)
        return _NO_WAKEUP

    async def _claim(self, queues: list[str], max_count: int, consumer: str, polled: bool
                     ) -> Claim:
        """The fetch script on each queue in turn; when nothing was ready, the wait
        before the next try: at most ``block_time``, less when delayed work (the
        script's answer, or this process's publish) or a claim round comes due."""
        try:
            out, next_due = await self._fetch_ready(queues, max_count, consumer)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker fetch") from exc
        if out:
            return Claim(out)
        now = time.monotonic()
        wait = min(self.block_time, min(self._next_claim.get(q, now) for q in queues) - now)
        if self._due_hint is not None:
            next_due = self._due_hint if next_due is None else min(next_due, self._due_hint)
        if next_due is not None:
            wait = min(wait, next_due - now_epoch())
        return Claim(out, wait)

    async def _wait_for_work(
        self, wake: object, queues: list[str], max_count: int, consumer: str, seconds: float
    ) -> list[Delivery]:
        """Block in XREADGROUP for new entries (a claim too: a fetch cancelled while
        the server leases entries for it hands them back at once)."""
        reads = _Reads()
        try:
            return await claim_safely(
                self._block(queues, max_count, consumer, seconds, reads),
                self.nack,
                self._background,
                abandon=partial(self._stop_reads, reads),
            )
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker fetch") from exc

    async def _fetch_ready(
        self, order: list[str], max_count: int, consumer: str
    ) -> tuple[list[Delivery], float | None]:
        """Run the fetch script on each queue in turn until ``max_count`` are leased."""
        await self._ensure_groups(order)
        fetch = self._script["fetch"]
        out: list[Delivery] = []
        next_due: float | None = None
        horizon = self._horizon_ms
        self._due_hint = None
        for queue in order:
            want = max_count - len(out)
            if want <= 0:
                break
            now = time.monotonic()
            claim = self._next_claim.get(queue, 0.0) <= now
            if claim:
                self._next_claim[queue] = now + self.claim_interval
            now_ms = int(now_epoch() * 1000)
            args: list[Any] = [GROUP, consumer, want, now_ms, int(claim), horizon, MOVER_BATCH]
            try:
                reply = await fetch(self.keys(queue).keys, args)
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Someone deleted the stream (and its group): recreate and retry once.
                self._ready_groups.discard(queue)
                await self._ensure_groups([queue])
                reply = await fetch(self.keys(queue).keys, args)
            if reply[0] is not None:
                due = int(reply[0]) / 1000.0
                next_due = due if next_due is None else min(next_due, due)
            if len(reply) > 1:
                self._deliveries(queue, reply, consumer, out)
        return out, next_due

    def _deliveries(self, queue: str, reply: list[Any], consumer: str, out: list[Delivery]) -> None:
        """Turn a fetch script reply into Deliveries (decoding each envelope once)."""
        now = now_epoch()
        default_vt = self.default_visibility_timeout
        for i in range(1, len(reply), 4):
            band = reply[i]
            eid = reply[i + 1]
            raw = reply[i + 2]
            count = reply[i + 3]
            d = delivery(
                queue,
                raw,
                f"{queue}:{band}:{eid.decode()}:{count}",
                RedisLease(band, eid, consumer, count, b"%d %s %d" % (band, eid, count)),
                now + default_vt,
                count > 1,
            )
            env = d.envelope
            if env is not None and env.visibility_timeout is not None:
                d.lease_expires_at = now + (lease_seconds(env.visibility_timeout) or default_vt)
            out.append(d)

    async def _stop_reads(self, reads: _Reads) -> None:
        """End the blocking reads of ``reads`` now (and any it starts later)."""
        reads.stopped = True
        for reader in list(reads.readers):
            await self._unblock(reader)

    async def _block(
        self,
        queues: Sequence[str],
        max_count: int,
        consumer: str,
        wait: float,
        reads: _Reads | None = None,
    ) -> list[Delivery]:
        """Wait up to ``wait`` s for new entries in any band of any queue (``reads``
        collects the reads, so a cancelled fetch can end them)."""
        if reads is None:
            reads = _Reads()
        order = list(dict.fromkeys(queues))
        if not self._conn.is_cluster or len(order) == 1:
            got = await self._block_read(order, max_count, consumer, wait, reads)
        else:
            # Streams of different queues live in different slots: one read per queue,
            # and the first to return data ends the others with CLIENT UNBLOCK.
            tasks = [
                asyncio.ensure_future(self._block_read([q], max_count, consumer, wait, reads))
                for q in order
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                await self._stop_reads(reads)
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
            got = []
            for r in results:
                if isinstance(r, BaseException):
                    raise r
                got.extend(r)
        if len(got) > max_count:
            # Only possible when entries landed in several streams between the fetch
            # script and the read: hand the surplus back at once, in place.
            await self.nack(got[max_count:])
            del got[max_count:]
        return got

    async def _block_read(
        self,
        queues: list[str],
        max_count: int,
        consumer: str,
        wait: float,
        reads: _Reads,
    ) -> list[Delivery]:
        streams: list[str] = []
        owner: dict[bytes, tuple[str, int]] = {}
        for q in queues:
            k = self.keys(q)
            for band in range(BANDS - 1, -1, -1):
                streams.append(k.streams[band])
                owner[k.streams[band].encode()] = (q, band)
        block_ms = max(1, int(wait * 1000))
        blocking = await self._conn.blocking_conn(streams[0])
        reader = _Reader(blocking, now_epoch() + wait, stop=reads.stopped)
        reads.readers.append(reader)
        conn = blocking.conn
        try:
            await conn.send_packed_command(
                conn.pack_commands(
                    [
                        ("CLIENT", "ID"),
                        (
                            "XREADGROUP",
                            "GROUP",
                            GROUP,
                            consumer,
                            "COUNT",
                            max_count,
                            "BLOCK",
                            block_ms,
                            "STREAMS",
                            *streams,
                            *([">"] * len(streams)),
                        ),
                    ]
                )
            )
            try:
                reader.client_id = int(await conn.read_response())
            except rexc.ResponseError:
                reader.client_id = None  # CLIENT not allowed (ACL): no early wake-up
            self._readers.add(reader)
            hint = self._due_hint
            if reader.stop or (hint is not None and reader.until > hint + 0.002):
                # Asked to stop, or delayed work was published while this read was
                # being set up.
                await self._unblock(reader)
            try:
                reply = await conn.read_response(timeout=wait + 10.0)
            except (rexc.MovedError, rexc.AskError, rexc.TryAgainError) as exc:
                # The cluster is resharding: the next fetch script call follows the
                # redirect and refreshes the slot map this read relied on.
                log.debug("redis.broker.block_redirected", error=repr(exc))
                reply = None
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # A stream (and its group) was deleted meanwhile: recreate on the next pass.
                self._ready_groups.difference_update(queues)
                reply = None
        finally:
            self._readers.discard(reader)
            await blocking.release()
        if not reply:
            return []
        return await self._block_deliveries(reply, owner, consumer)

    async def _block_deliveries(
        self, reply: list[Any], owner: dict[bytes, tuple[str, int]], consumer: str
    ) -> list[Delivery]:
        now = now_epoch()
        default_vt = self.default_visibility_timeout
        per_stream: list[tuple[int, int, list[Delivery]]] = []
        own_lease: dict[float, list[Delivery]] = {}
        queue_rank = {q: i for i, q in enumerate(dict.fromkeys(q for q, _ in owner.values()))}
        for stream, entries in reply:
            queue, band = owner[bytes(stream)]
            batch: list[Delivery] = []
            for eid, fields in entries:
                raw = fields[1] if fields and fields[0] == b"p" else b""
                d = delivery(
                    queue,
                    raw,
                    f"{queue}:{band}:{eid.decode()}:1",
                    RedisLease(band, eid, consumer, 1, b"%d %s 1" % (band, eid)),
                    now + default_vt,
                    False,
                )
                batch.append(d)
                env = d.envelope
                vt = None if env is None else lease_seconds(env.visibility_timeout)
                if vt is not None:
                    d.lease_expires_at = now + vt
                    if vt != default_vt:
                        own_lease.setdefault(vt, []).append(d)
            per_stream.append((queue_rank[queue], -band, batch))
        per_stream.sort(key=lambda t: (t[0], t[1]))
        # The fetch script sets per-envelope leases itself; entries read here need it
        # done now (one more round trip, only for envelopes with their own timeout).
        for vt, ds in own_lease.items():
            await self.extend_lease(ds, vt)
        return [d for _, _, batch in per_stream for d in batch]

    # -- Broker: settling ----------------------------------------------------------

    @staticmethod
    def _by_queue(deliveries: Iterable[Delivery]) -> dict[str, list[Delivery]]:
        groups: dict[str, list[Delivery]] = {}
        for d in deliveries:
            if isinstance(d.lease, RedisLease):
                groups.setdefault(d.queue, []).append(d)
        return groups

    async def _settle(self, name: str, calls: list[tuple[str, list[Any]]], what: str) -> list[Any]:
        """Run script ``name`` once per (queue, args), concurrently."""
        script: Any = self._script[name]
        try:
            if len(calls) == 1:
                q, args = calls[0]
                return [await script(self.keys(q).keys, args)]
            return list(await asyncio.gather(*(script(self.keys(q).keys, a) for q, a in calls)))
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, f"Stem broker {what}") from exc

    @staticmethod
    def _held(ds: list[Delivery]) -> tuple[list[Any], list[Delivery]]:
        """Script arguments naming ``ds`` (deliveries with a :class:`RedisLease`) —
        (consumer, "item;item;...") pairs — and ``ds`` in the order of the flags the
        script returns."""
        leases: list[RedisLease] = [d.lease for d in ds]  # type: ignore[misc]
        first = leases[0].consumer
        if all(lease.consumer == first for lease in leases):
            return [first, b";".join([lease.item for lease in leases])], ds
        by_consumer: dict[str, list[Delivery]] = {}
        for d, lease in zip(ds, leases, strict=True):
            by_consumer.setdefault(lease.consumer, []).append(d)
        args: list[Any] = []
        ordered: list[Delivery] = []
        for consumer, group in by_consumer.items():
            args += (consumer, b";".join([d.lease.item for d in group]))  # type: ignore[attr-defined]
            ordered += group
        return args, ordered

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK + XDEL each delivery still held by its consumer (one script per queue)."""
        calls = [(q, [GROUP, *self._held(ds)[0]]) for q, ds in self._by_queue(deliveries).items()]
        if calls:
            await self._settle("ack", calls, "ack")

    async def _nack(self, deliveries: Sequence[Delivery]) -> None:
        """The entries are fetched again at once, keeping their place."""
        calls = [(q, [GROUP, *self._held(ds)[0]]) for q, ds in self._by_queue(deliveries).items()]
        if calls:
            await self._settle("nack", calls, "nack")

    async def _retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Ack each held delivery and add its replacement in the same script.

        A replacement for another queue is published
        after its delivery is acked (two steps: the queues live in different slots).
        """
        now = now_epoch()
        same: dict[str, list[Any]] = {}
        other: dict[str, list[tuple[Delivery, Envelope]]] = {}
        soonest: float | None = None
        for d, env in items:
            lease = d.lease
            if not isinstance(lease, RedisLease):
                continue
            if env.queue != d.queue:
                other.setdefault(d.queue, []).append((d, env))
                continue
            due = env.not_before_epoch
            if due is not None and due > now:
                due_arg: int | str = int(due * 1000)
                soonest = due if soonest is None else min(soonest, due)
            else:
                due_arg = ""
            args = same.get(d.queue)
            if args is None:
                args = same[d.queue] = [GROUP]
            args += (
                lease.item,
                lease.consumer,
                band_of(env.priority),
                due_arg,
                _vt_ms(env.visibility_timeout),
                env.to_json(),
            )
        if same:
            await self._settle("retry", list(same.items()), "retry")
            if soonest is not None:
                await self._delayed_published(soonest)
        if other:
            names = list(other)
            held_args = [self._held([d for d, _ in other[q]]) for q in names]
            flags = await self._settle(
                "ack",
                [(q, [GROUP, *a]) for q, (a, _) in zip(names, held_args, strict=True)],
                "retry",
            )
            replacements = {id(d): env for q in names for d, env in other[q]}
            held = [
                replacements[id(d)]
                for (_, ordered), f in zip(held_args, flags, strict=True)
                for d, ok in zip(ordered, f, strict=True)
                if ok == ord("1")
            ]
            if held:
                await self._publish(held)

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Move held deliveries to their queue's dead-letter stream with ``reason``.

        The stream is capped at about ``dead_letter_max`` entries; the oldest dead
        letters dropped to stay under it are counted (:meth:`dead_letters_trimmed`) and
        logged as ``redis.broker.dead_letters_trimmed``.
        """
        now_ms = int(now_epoch() * 1000)
        calls: dict[str, list[Any]] = {}
        for d, reason in items:
            lease = d.lease
            if not isinstance(lease, RedisLease):
                continue
            args = calls.get(d.queue)
            if args is None:
                args = calls[d.queue] = [GROUP, now_ms, self.dead_letter_max]
            args += (lease.item, lease.consumer, reason)
        if not calls:
            return
        replies = await self._settle("dead", list(calls.items()), "dead_letter")
        for queue, (_, trimmed) in zip(calls, replies, strict=True):
            if int(trimmed) > 0:
                log.warning(
                    "redis.broker.dead_letters_trimmed",
                    queue=queue,
                    trimmed=int(trimmed),
                    dead_letter_max=self.dead_letter_max,
                )

    async def _extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        now = now_epoch()
        groups = self._by_queue(deliveries)
        if not groups:
            return
        lease_ms = round(seconds * 1000)
        calls: list[tuple[str, list[Any]]] = []
        orders: list[list[Delivery]] = []
        for queue, ds in groups.items():
            held_args, ordered = self._held(ds)
            calls.append((queue, [GROUP, int(now * 1000), self._horizon_ms, lease_ms, *held_args]))
            orders.append(ordered)
        flags = await self._settle("extend", calls, "extend_lease")
        for ordered, f in zip(orders, flags, strict=True):
            for d, ok in zip(ordered, f, strict=True):
                if ok == ord("1"):
                    d.lease_expires_at = now + seconds

    # -- Broker: inspection and maintenance ------------------------------------------

    async def stats(self, queue: str) -> QueueStats:
        """Ready (incl. nacked), delayed, leased and dead counts of ``queue``."""
        (reply,) = await self._settle("stats", [(queue, [GROUP])], "stats")
        ready, in_flight, delayed, dead = (int(x) for x in reply)
        return QueueStats(queue, pending=ready, delayed=delayed, in_flight=in_flight, dead=dead)

    async def dead_letters_trimmed(self, queue: str) -> int:
        """How many dead letters of ``queue`` the ``dead_letter_max`` cap has dropped
        (oldest first) since the queue's keys were created."""
        try:
            n = await self._conn.client.execute_command("GET", self.keys(queue).trimmed)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker dead_letters_trimmed") from exc
        return int(n or 0)

    async def purge(self, queue: str) -> int:
        """Drop every ready and delayed envelope of ``queue`` (leased ones stay)."""
        total = 0
        while True:
            ((removed, more),) = await self._settle("purge", [(queue, [GROUP, 5000])], "purge")
            total += int(removed)
            if not int(more):
                return total

    async def delete(self, queue: str, task_ids: Sequence[str]) -> int:
        """Drop the waiting envelopes of ``queue`` with these task ids (one script)."""
        if not task_ids:
            return 0
        (removed,) = await self._settle("delete", [(queue, [GROUP, *task_ids])], "delete")
        return int(removed)

    async def dead_letters(self, queue: str, limit: int = 100, *, offset: int = 0,
                           since: float | None = None) -> list[DeadLetter]:
        """Dead letters of ``queue``, oldest first (see :class:`stem.ports.Broker`).

        Entry ids are times, so ``since`` is where the range starts; ``offset`` is
        skipped page by page.
        """
        if limit <= 0:
            return []
        out: list[DeadLetter] = []
        skip = max(0, offset)
        start = _since_id(since)
        while len(out) < limit:
            chunk = min(1000, skip + limit - len(out))
            entries = await self._dead_range(queue, start, chunk)
            for eid, fields in entries:
                if skip:
                    skip -= 1
                elif len(out) < limit:
                    out.append(self._dead_entry(queue, eid, fields))
            if len(entries) < chunk:
                break
            start = "(" + entries[-1][0].decode()
        return out

    async def get_dead_letter(self, queue: str, dead_letter_id: str) -> DeadLetter | None:
        """The newest dead letter of ``queue`` with this id (a scan of its stream), or None."""
        found: DeadLetter | None = None
        start = "-"
        while True:
            entries = await self._dead_range(queue, start, 1000)
            for eid, fields in entries:
                letter = self._dead_entry(queue, eid, fields)
                if letter.id == dead_letter_id:
                    found = letter
            if len(entries) < 1000:
                return found
            start = "(" + entries[-1][0].decode()

    async def _dead_range(self, queue: str, start: str, count: int) -> list[Any]:
        try:
            reply = await self._conn.client.execute_command(
                "XRANGE", self.keys(queue).dead, start, "+", "COUNT", count
            )
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker dead letters") from exc
        return list(reply or [])

    @staticmethod
    def _dead_entry(queue: str, eid: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
        raw = fields.get(b"p", b"")
        env, _ = decode_stored(raw)
        sid = eid.decode()
        dl_id = env.id if env is not None else (peek_task_id(raw) or sid)
        return DeadLetter(
            id=dl_id,
            queue=queue,
            raw=raw,
            reason=fields.get(b"r", b"").decode("utf-8", "replace"),
            dead_at=int(fields.get(b"t", b"0")) / 1000.0,
            envelope=env,
            meta={"entry_id": sid},
        )

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

        Undecodable ones stay: publishing the same bad bytes could only dead-letter
        them again.
        """
        wanted = None if ids is None else set(ids)
        count = 0
        start = _since_id(since)
        soonest: float | None = None
        while limit is None or count < limit:
            entries = await self._dead_range(queue, start, 500)
            if not entries:
                break
            start = "(" + entries[-1][0].decode()
            args: list[Any] = [GROUP]
            for eid, fields in entries:
                if limit is not None and count + (len(args) - 1) // 5 >= limit:
                    break
                env, _ = decode_stored(fields.get(b"p", b""))
                if env is None or (wanted is not None and env.id not in wanted):
                    continue
                fresh = replayed(env, delay)
                due = fresh.not_before_epoch
                if due is not None:
                    soonest = due if soonest is None else min(soonest, due)
                args.extend(
                    (
                        eid,
                        band_of(fresh.priority),
                        _vt_ms(fresh.visibility_timeout),
                        b"" if due is None else b"%d" % int(due * 1000),
                        fresh.to_json(),
                    )
                )
            if len(args) > 1:
                (n,) = await self._settle("replay", [(queue, args)], "replay")
                count += int(n)
            if len(entries) < 500:
                break
        if soonest is not None and count:
            await self._delayed_published(soonest)
        return count

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead letter of ``queue``."""
        try:
            n = await self._conn.client.execute_command("XTRIM", self.keys(queue).dead, "MAXLEN", 0)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem broker purge_dead_letters") from exc
        return int(n)

    async def _interrupt(self) -> None:
        for reader in list(self._readers):
            await self._unblock(reader)

    async def _close(self) -> None:
        """Drop this broker's idle consumer names, close connections (a later call
        reconnects)."""
        if self._consumers and self._ready_groups and self._conn.has_client:
            # Forget our consumers (and long-idle ones of crashed workers) when they hold
            # nothing, so groups don't collect a consumer per worker ever started.
            args = [GROUP, FORGET_IDLE_MS, *sorted(self._consumers)]
            try:
                await self._settle("forget", [(q, args) for q in self._ready_groups], "close")
            except (rexc.RedisError, ServiceUnavailableError) as exc:
                log.debug("redis.broker.forget_consumers_failed", error=repr(exc))
        self._consumers.clear()
        self._scripts = None
        self._ready_groups.clear()
        if self._owns_conn:
            await self._conn.close()
