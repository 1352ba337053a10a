"""Redis result backend: one JSON string per task with a TTL, pub/sub for ``wait()``.

Keys are ``<namespace>:result:<task id>`` (no hash tag: results spread over a
cluster). Writing a terminal status also PUBLISHes it on the channel of the same
name, so ``wait()`` is woken by the write itself; a waiter subscribes *before* it
reads the key, so a status written in between is never missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from stem._aio import cancel_and_wait, wait_event
from stem.adapters._shared import check_max_items, check_namespace, meta_appended
from stem.adapters._waiting import Watch, wait_for_terminal
from stem.errors import ServiceUnavailableError, StemError
from stem.log import get_logger
from stem.ports import DEFAULT_RESULT_TTL
from stem.status import TaskStatus

from . import scripts
from ._connection import CONNECTION_ERRORS, RedisConnector, RedisSettings

log = get_logger(__name__)

#: A waiter re-reads its key this often even without a notification: pub/sub is
#: fire-and-forget, so a message sent while the subscriber was reconnecting is lost.
RECHECK_INTERVAL = 5.0
#: ``append_meta`` reads and compare-and-sets at most this many times when other
#: writers keep changing the status in between (each round one of them wins).
APPEND_ROUNDS = 100


class _Waiter:
    """One wait() call's mailbox: the reader puts the published status here."""

    __slots__ = ("data", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.data: bytes | None = None

    def wake(self, data: bytes | None) -> None:
        if data is not None:
            self.data = data
        self.event.set()


class _Notifier:
    """One pub/sub connection shared by every ``wait()`` of a backend.

    Channels are subscribed while at least one waiter wants them. Each SUBSCRIBE
    queues a confirmation future resolved by the server's ``subscribe`` reply (they
    arrive in order), so a waiter knows it is subscribed before it reads the key.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self._connector = connector
        self._client: aioredis.Redis | None = None
        self._ps: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[bytes, set[_Waiter]] = {}
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._subscribed: dict[bytes, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()

    async def _pubsub(self) -> PubSub:
        if self._ps is None:
            client = self._connector.client
            if isinstance(client, RedisCluster):
                # Plain PUBLISH reaches every node of a cluster, so any node will do.
                await client.initialize()
                node = client.get_default_node()
                kwargs = dict(self._connector.settings.connection_kwargs)
                if kwargs.pop("connection_class", None) is not None:
                    kwargs["ssl"] = True
                self._client = aioredis.Redis(host=node.host, port=int(node.port), **kwargs)
                self._ps = self._client.pubsub()
            else:
                self._ps = client.pubsub()
        return self._ps

    async def add(self, channel: bytes) -> _Waiter:
        """Register a waiter on ``channel``; returns once the subscription is active."""
        waiter = _Waiter()
        waiters = self._waiters.get(channel)
        if waiters is not None:
            waiters.add(waiter)
            confirmed = self._subscribed[channel]
        else:
            self._waiters[channel] = {waiter}
            confirmed = asyncio.get_running_loop().create_future()
            self._subscribed[channel] = confirmed
            try:
                async with self._lock:
                    ps = await self._pubsub()
                    self._confirms.setdefault(channel, deque()).append(confirmed)
                    await ps.subscribe(channel)
            except BaseException:
                await self.remove(channel, waiter)
                raise
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await asyncio.shield(confirmed)
        except BaseException:
            await self.remove(channel, waiter)
            raise
        return waiter

    async def remove(self, channel: bytes, waiter: _Waiter) -> None:
        """Drop a waiter; unsubscribe when it was the channel's last."""
        waiters = self._waiters.get(channel)
        if waiters is None:
            return
        waiters.discard(waiter)
        if waiters:
            return
        del self._waiters[channel]
        confirmed = self._subscribed.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()
        if self._ps is not None:
            try:
                async with self._lock:
                    await self._ps.unsubscribe(channel)
            except CONNECTION_ERRORS:
                pass  # the connection is gone; the resubscribe on reconnect skips it

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for w in waiters:
                w.wake(None)

    async def _read(self) -> None:
        ps = self._ps
        assert ps is not None
        outage: float | None = None
        backoff = 0.05
        while True:
            try:
                if outage is not None:
                    conn = ps.connection
                    if conn is not None and not conn.is_connected:
                        await conn.connect()  # re-subscribes every channel
                    log.info(
                        "redis.backend.pubsub_reconnected",
                        after=round(time.monotonic() - outage, 3),
                    )
                    outage, backoff = None, 0.05
                    self._wake_all()  # re-read: notifications during the outage are lost
                msg = await ps.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as exc:
                if outage is None:
                    outage = time.monotonic()
                    log.warning(
                        "redis.backend.pubsub_unavailable",
                        error=str(self._connector.unavailable(exc, "Stem result backend wait")),
                    )
                    self._wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if msg is None:
                continue
            kind = msg["type"]
            channel = msg["channel"]
            if kind == "message":
                for w in self._waiters.get(channel, ()):
                    w.wake(msg["data"])
            elif kind == "subscribe":
                pending = self._confirms.get(channel)
                if pending:
                    fut = pending.popleft()
                    if not pending:
                        del self._confirms[channel]
                    if not fut.done():
                        fut.set_result(None)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await cancel_and_wait(reader)
        if self._ps is not None:
            await self._ps.aclose()  # type: ignore[no-untyped-call]
            self._ps = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        for fut in self._subscribed.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        self._confirms.clear()
        self._subscribed.clear()


class RedisBackend:
    """A :class:`stem.ports.ResultBackend` on Redis strings with TTLs."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        namespace: str = "stem",
        default_ttl: float = DEFAULT_RESULT_TTL,
        connector: RedisConnector | None = None,
    ) -> None:
        self.namespace = check_namespace(namespace)
        self.default_ttl = default_ttl
        # A store passes the client its parts share; alone, the backend owns one.
        self._owns_conn = connector is None
        self._conn = RedisConnector(settings) if connector is None else connector
        self._prefix = f"{namespace}:result:"
        self._notifier: _Notifier | None = None
        self._set_script: Any = None
        self._add_script: Any = None
        self._cas_script: tuple[Any, AsyncScript] | None = None

    def __repr__(self) -> str:
        return f"RedisBackend({self._conn.settings.safe_url!r}, namespace={self.namespace!r})"

    def key(self, task_id: str) -> str:
        """The key (and pub/sub channel) of ``task_id``'s status."""
        return self._prefix + task_id

    async def ping(self) -> None:
        """PING the server; raise ServiceUnavailableError naming the URL and what to check."""
        await self._conn.ping("Stem result backend")

    async def set_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> None:
        """SET each status with its TTL and PUBLISH terminal ones, in one round trip.

        One script call per batch; on a cluster (keys in many slots) a pipeline.
        """
        if not items:
            return
        keys: list[str] = []
        raws: list[bytes] = []
        ttls: list[bytes] = []
        default_ttl = self.default_ttl
        prefix = self._prefix
        for status, ttl in items:
            keys.append(prefix + status.id)
            raws.append(status.to_json())
            ms = max(1, round((default_ttl if ttl is None else ttl) * 1000))
            ttls.append(b"%d:%d" % (ms, status.state.is_terminal))
        client = self._conn.client
        try:
            if isinstance(client, RedisCluster):
                pipe = client.pipeline(transaction=False)
                for key, raw, ttl_flag in zip(keys, raws, ttls, strict=True):
                    ms_text, _, terminal = ttl_flag.partition(b":")
                    pipe.execute_command("SET", key, raw, "PX", ms_text)
                    if terminal == b"1":
                        pipe.execute_command("PUBLISH", key, raw)
                await pipe.execute()
            elif len(keys) == 1 and ttls[0].endswith(b":0"):
                await self._conn.lanes.call("SET", keys[0], raws[0], "PX", ttls[0][:-2])
            else:
                if self._set_script is None:
                    self._set_script = self._conn.script(scripts.SET_STATUSES)
                await self._set_script(keys, [b",".join(ttls), *raws])
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem result backend set") from exc

    async def add_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> set[str]:
        """``SET NX`` each status with its TTL (terminal ones are also PUBLISHed); return
        the ids written. One script call; on a cluster a pipeline (each SET NX is still
        atomic for its id)."""
        if not items:
            return set()
        by_id: dict[str, tuple[TaskStatus, float | None]] = {}
        for s, t in items:
            by_id.setdefault(s.id, (s, t))  # a repeated id keeps its first status
        unique = list(by_id.values())
        keys = [self._prefix + s.id for s, _ in unique]
        raws = [s.to_json() for s, _ in unique]
        ttls = [b"%d:%d" % (max(1, round((self.default_ttl if t is None else t) * 1000)),
                            s.state.is_terminal) for s, t in unique]
        client = self._conn.client
        try:
            if isinstance(client, RedisCluster):
                pipe = client.pipeline(transaction=False)
                for key, raw, flag in zip(keys, raws, ttls, strict=True):
                    pipe.execute_command("SET", key, raw, "NX", "PX", flag.partition(b":")[0])
                replies = await pipe.execute()
                written = [i for i, r in enumerate(replies) if r]
                for i in written:  # rare: add_many is for queued statuses
                    if unique[i][0].state.is_terminal:
                        await client.execute_command("PUBLISH", keys[i], raws[i])
            else:
                if self._add_script is None:
                    self._add_script = self._conn.script(scripts.ADD_STATUSES)
                written = [int(p) - 1 for p in await self._add_script(keys, [b",".join(ttls), *raws])]
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem result backend add") from exc
        return {unique[i][0].id for i in written}

    async def forget_many(self, task_ids: Sequence[str]) -> None:
        """DEL these statuses (one command; on a cluster a pipeline of DELs)."""
        keys = [self._prefix + i for i in dict.fromkeys(task_ids)]
        if not keys:
            return
        client = self._conn.client
        try:
            if isinstance(client, RedisCluster):
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.execute_command("DEL", key)
                await pipe.execute()
            else:
                await client.execute_command("DEL", *keys)  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem result backend forget") from exc

    async def get(self, task_id: str) -> TaskStatus | None:
        """The stored status, or None if unknown or expired."""
        try:
            raw = await self._conn.client.execute_command("GET", self._prefix + task_id)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem result backend get") from exc
        return None if raw is None else TaskStatus.from_json(raw)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        """Statuses of the ids that exist: one MGET (a pipeline of GETs on a cluster)."""
        if not task_ids:
            return {}
        ids = list(dict.fromkeys(task_ids))
        keys = [self._prefix + i for i in ids]
        client = self._conn.client
        try:
            if isinstance(client, RedisCluster):
                # MGET would cross slots; the cluster pipeline sends one batch per node.
                pipe = client.pipeline()
                for k in keys:
                    pipe.execute_command("GET", k)
                values = await pipe.execute()
            else:
                values = await client.execute_command("MGET", *keys)  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem result backend get_many") from exc
        from_json = TaskStatus.from_json
        return {i: from_json(v) for i, v in zip(ids, values, strict=True) if v is not None}

    async def append_meta(self, task_id: str, key: str, item: dict[str, Any], *,
                          max_items: int = 100) -> bool:
        """Append ``item`` to ``meta[key]``: GET, change the JSON here, then a
        compare-and-set script (:data:`scripts.STATUS_CAS`) writes it only if the value
        is still the one read, keeping its TTL; read again when another write got there
        first. One key, so Redis Cluster runs it too."""
        check_max_items(max_items)
        name = self._prefix + task_id
        client = self._conn.client
        if self._cas_script is None or self._cas_script[0] is not client:
            self._cas_script = (client, client.register_script(scripts.STATUS_CAS))
        script: Any = self._cas_script[1]
        try:
            for _ in range(APPEND_ROUNDS):
                raw = await client.execute_command("GET", name)
                if raw is None:
                    return False
                if isinstance(raw, str):
                    raw = raw.encode()
                new = meta_appended(raw, key, item, max_items)
                done = int(await script([name], [hashlib.sha1(raw).hexdigest(), new]))
                if done != 0:
                    return done == 1
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem result backend append_meta") from exc
        raise StemError(f"append_meta({task_id!r}): the status changed on every one of "
                        f"{APPEND_ROUNDS} attempts")

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus | None:
        """Return the terminal status as soon as it is written, else None on timeout.

        The write publishes the status on the task's channel, so a waiter usually gets
        it without reading; it re-reads every ``RECHECK_INTERVAL`` as a safety net.
        """
        if self._notifier is None:
            self._notifier = _Notifier(self._conn)
        notifier = self._notifier
        channel = (self._prefix + task_id).encode()

        async def arm() -> Watch:
            try:
                return _ChannelWatch(notifier, channel, await notifier.add(channel))
            except CONNECTION_ERRORS as exc:
                raise self._conn.unavailable(exc, "Stem result backend wait") from exc

        reads = 0

        async def read() -> TaskStatus | None:
            nonlocal reads
            reads += 1
            if reads == 1:
                return await self.get(task_id)  # the first read fails fast (a wrong URL)
            try:
                return await self.get(task_id)
            except ServiceUnavailableError as exc:  # an outage: wait on until the deadline
                log.debug("redis.backend.wait_recheck_failed", error=repr(exc))
                return None

        return await wait_for_terminal(arm, read, timeout)

    async def close(self) -> None:
        """Close the pub/sub connection and the client (a later call reconnects)."""
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.close()
        self._set_script = self._add_script = None
        self._cas_script = None
        if self._owns_conn:
            await self._conn.close()


class _ChannelWatch:
    """A :class:`~stem.adapters._waiting.Watch` on one task's pub/sub channel."""

    def __init__(self, notifier: _Notifier, channel: bytes, waiter: _Waiter) -> None:
        self._notifier = notifier
        self._channel = channel
        self._waiter = waiter

    async def changed(self, seconds: float | None) -> TaskStatus | bool:
        step = RECHECK_INTERVAL if seconds is None else min(seconds, RECHECK_INTERVAL)
        await wait_event(self._waiter.event, step)
        self._waiter.event.clear()
        data, self._waiter.data = self._waiter.data, None
        if data is not None:
            return TaskStatus.from_json(data)
        return True  # woken without data, or the recheck interval passed: read again

    async def close(self) -> None:
        await self._notifier.remove(self._channel, self._waiter)
