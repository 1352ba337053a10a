"""What every adapter's store does the same way: lazy parts, ping, close, ``async with``.

An adapter subclasses :class:`BaseStore` and fills narrow hooks: ``_make_broker`` and
``_make_backend`` build the parts on the store's shared connections, ``_close_shared``
closes those connections, and ``migrate`` runs the schema migrations (nothing for
stores without a schema).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from stem._urls import mask_url
from stem.ports import Broker, GroupStore, LockStore, RateLimiter, ResultBackend, ScheduleStore

B = TypeVar("B", bound=Broker)
R = TypeVar("R", bound=ResultBackend)


class BaseStore(Generic[B, R]):
    """One URL's connections and the broker and backend built on them (see stem.ports.Store)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self._broker: B | None = None
        self._backend: R | None = None
        self._locks: LockStore | None = None
        self._schedules: ScheduleStore | None = None
        self._rate_limiter: RateLimiter | None = None
        self._groups: GroupStore | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.url)!r} namespace={self.namespace!r}>"

    # -- hooks --------------------------------------------------------------------------

    def _make_broker(self) -> B:
        raise NotImplementedError

    def _make_backend(self) -> R:
        raise NotImplementedError

    def _make_locks(self) -> LockStore:
        raise NotImplementedError(f"{type(self).__name__} has no lock store yet")

    def _make_schedules(self) -> ScheduleStore:
        raise NotImplementedError(f"{type(self).__name__} has no schedule store yet")

    def _make_rate_limiter(self) -> RateLimiter:
        raise NotImplementedError(f"{type(self).__name__} has no rate limiter yet")

    def _make_groups(self) -> GroupStore:
        raise NotImplementedError(f"{type(self).__name__} has no group store yet")

    async def _close_shared(self) -> None:
        """Close the connections the parts share (after the parts closed their own)."""

    # -- the Store protocol -------------------------------------------------------------

    @property
    def broker(self) -> B:
        """The broker on this store's connections (built on first use)."""
        if self._broker is None:
            self._broker = self._make_broker()
        return self._broker

    @property
    def backend(self) -> R:
        """The result backend on this store's connections (built on first use)."""
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    @property
    def locks(self) -> LockStore:
        """The lock store on this store's connections (built on first use)."""
        if self._locks is None:
            self._locks = self._make_locks()
        return self._locks

    @property
    def schedules(self) -> ScheduleStore:
        """The schedule store on this store's connections (built on first use)."""
        if self._schedules is None:
            self._schedules = self._make_schedules()
        return self._schedules

    @property
    def rate_limiter(self) -> RateLimiter:
        """The rate limiter on this store's connections (built on first use)."""
        if self._rate_limiter is None:
            self._rate_limiter = self._make_rate_limiter()
        return self._rate_limiter

    @property
    def groups(self) -> GroupStore:
        """The group store (groups, chords, batches) on this store's connections."""
        if self._groups is None:
            self._groups = self._make_groups()
        return self._groups

    async def ping(self) -> None:
        """Check the store answers (through the broker's connection)."""
        await self.broker.ping()

    async def migrate(self) -> list[int]:
        """Create or upgrade the schema; stores without versioned migrations apply none."""
        await self.ping()  # creates tables where a store does that on connect
        return []

    async def close(self) -> None:
        """Close the parts, then the shared connections (a later use reopens them)."""
        for part in (self._broker, self._backend, self._locks, self._schedules,
                     self._rate_limiter, self._groups):
            if part is not None:
                await part.close()
        await self._close_shared()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
