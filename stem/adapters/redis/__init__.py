"""Redis adapters: ``redis://``, ``rediss://`` (TLS), ``redis+sentinel://`` and Redis
Cluster (``?cluster=1``).

Stem's tunables ride in the URL's query string, e.g.
``redis://localhost:6379/0?claim_interval=0.5&block_time=1&default_visibility_timeout=30``
and ``?dead_letter_max=100000`` (each queue's dead-letter stream cap) for the broker and
``?result_ttl=3600`` for the result backend. An unknown key or a bad value is a
ConfigurationError. Nothing connects until the first command; ``ping()`` reports an
unreachable server clearly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stem.adapters._shared import add_then_publish, check_namespace
from stem.adapters._store import BaseStore
from stem.envelope import Envelope
from stem.ports import DEFAULT_RESULT_TTL, DEFAULT_VISIBILITY_TIMEOUT
from stem.status import TaskStatus

from ._connection import DEFAULT_DEAD_LETTER_MAX, RedisConnector, RedisSettings, parse_redis_url
from .backend import RedisBackend
from .broker import DEFAULT_BLOCK_TIME, DEFAULT_CLAIM_INTERVAL, RedisBroker
from .groups import RedisGroupStore
from .locks import RedisLockStore
from .ratelimit import RedisRateLimiter
from .schedules import RedisScheduleStore

__all__ = [
    "RedisBackend",
    "RedisBroker",
    "RedisLockStore",
    "RedisScheduleStore",
    "RedisSettings",
    "RedisStore",
    "backend_from_url",
    "broker_from_url",
    "parse_redis_url",
    "store_from_url",
]


def _broker(settings: RedisSettings, namespace: str,
            connector: RedisConnector | None = None) -> RedisBroker:
    return RedisBroker(
        settings,
        namespace=namespace,
        block_time=settings.seconds("block_time", DEFAULT_BLOCK_TIME),
        claim_interval=settings.seconds("claim_interval", DEFAULT_CLAIM_INTERVAL),
        default_visibility_timeout=settings.seconds(
            "default_visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT
        ),
        dead_letter_max=settings.count("dead_letter_max", DEFAULT_DEAD_LETTER_MAX),
        connector=connector,
    )


def _backend(settings: RedisSettings, namespace: str,
             connector: RedisConnector | None = None) -> RedisBackend:
    return RedisBackend(
        settings,
        namespace=namespace,
        default_ttl=settings.seconds("result_ttl", DEFAULT_RESULT_TTL),
        connector=connector,
    )


class RedisStore(BaseStore[RedisBroker, RedisBackend]):
    """Broker, result backend, lock and schedule stores for one Redis URL, sharing one
    client (connection pool).

    ``client=`` takes a ``redis.asyncio.Redis`` (or ``RedisCluster``) the application
    already has; the store then uses it and leaves closing it to the application.
    """

    def __init__(self, url: str, *, namespace: str = "stem", client: Any = None) -> None:
        super().__init__(url, check_namespace(namespace))
        self.settings = parse_redis_url(url)
        self.connector = RedisConnector(self.settings, client=client)

    def _make_broker(self) -> RedisBroker:
        return _broker(self.settings, self.namespace, self.connector)

    def _make_backend(self) -> RedisBackend:
        return _backend(self.settings, self.namespace, self.connector)

    def _make_groups(self) -> RedisGroupStore:
        return RedisGroupStore(self.connector, namespace=self.namespace)

    def _make_locks(self) -> RedisLockStore:
        return RedisLockStore(self.settings, namespace=self.namespace, connector=self.connector)

    def _make_schedules(self) -> RedisScheduleStore:
        return RedisScheduleStore(self.settings, namespace=self.namespace,
                                  connector=self.connector)

    def _make_rate_limiter(self) -> RedisRateLimiter:
        return RedisRateLimiter(self.connector, namespace=self.namespace)

    async def _close_shared(self) -> None:
        await self.connector.close()

    async def publish_new(
        self,
        items: Sequence[tuple[Envelope, TaskStatus, float | None]],
        *,
        default_ttl: float = DEFAULT_RESULT_TTL,
        locks: Mapping[str, tuple[str, float]] | None = None,
    ) -> set[str]:
        """Write each new id's status (``SET NX``) and publish it in one script per queue;
        ids that already have a status are skipped, and so are unique tasks whose lock
        (``locks``: id -> (lock key, seconds)) another task holds
        (stem.ports.AtomicPublishStore).

        On Redis Cluster the status keys live in other slots than the queue's, so there
        it takes two steps (statuses first, then the envelopes; the statuses are deleted
        again if the publish fails).
        """
        broker, backend = self.broker, self.backend
        if self.connector.is_cluster:
            return await add_then_publish(broker, backend, items, default_ttl=default_ttl,
                                          locks=locks, lock_store=self.locks)
        lock_store = self.locks
        assert isinstance(lock_store, RedisLockStore)
        lock_keys = None if not locks else {
            task_id: (lock_store.key(key), ttl) for task_id, (key, ttl) in locks.items()}
        return await broker.publish_new(items, backend.key(""), default_ttl=default_ttl,
                                        locks=lock_keys)


def store_from_url(url: str, *, namespace: str = "stem") -> RedisStore:
    """A :class:`RedisStore` for ``url`` (not connected yet)."""
    return RedisStore(url, namespace=namespace)


def broker_from_url(url: str, *, namespace: str = "stem") -> RedisBroker:
    """A :class:`RedisBroker` for ``url`` with a client of its own (not connected yet)."""
    return _broker(parse_redis_url(url), namespace)


def backend_from_url(url: str, *, namespace: str = "stem") -> RedisBackend:
    """A :class:`RedisBackend` for ``url`` with a client of its own (not connected yet)."""
    return _backend(parse_redis_url(url), namespace)
