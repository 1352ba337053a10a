"""In-process adapters: ``memory://NAME``.

The same ``NAME`` (and namespace) gives the same instance everywhere in the process,
so an app and an in-process worker built from the same URL share their queues and
results. ``memory://`` alone is the instance ``"default"``. Data lives until the
process ends or :func:`reset` is called; ``close()`` keeps it, because another
component may still be using the shared instance.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from stem._urls import mask_url
from stem.adapters._shared import check_namespace, check_no_query
from stem.adapters._store import BaseStore
from stem.errors import ConfigurationError

from .backend import MemoryBackend
from .broker import MemoryBroker
from .groups import MemoryGroupStore
from .locks import MemoryLockStore
from .ratelimit import MemoryRateLimiter
from .schedules import MemoryScheduleStore

__all__ = [
    "MemoryBackend", "MemoryBroker", "MemoryGroupStore", "MemoryLockStore", "MemoryRateLimiter",
    "MemoryScheduleStore", "MemoryStore", "backend_from_url", "broker_from_url",
    "reset", "store_from_url",
]

T = TypeVar("T")
_lock = threading.Lock()
_brokers: dict[tuple[str, str], MemoryBroker] = {}
_backends: dict[tuple[str, str], MemoryBackend] = {}
_groups: dict[tuple[str, str], MemoryGroupStore] = {}
_locks: dict[tuple[str, str], MemoryLockStore] = {}
_schedules: dict[tuple[str, str], MemoryScheduleStore] = {}
_rate_limiters: dict[tuple[str, str], MemoryRateLimiter] = {}


def _name(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "memory":
        raise ConfigurationError(f"not a memory:// URL: {mask_url(url)!r}")
    check_no_query(url, "memory://")
    return parts.netloc or parts.path.strip("/") or "default"


def broker_from_url(url: str, *, namespace: str = "stem") -> MemoryBroker:
    """The process-wide :class:`MemoryBroker` named by ``url`` in ``namespace``."""
    key = (check_namespace(namespace), _name(url))
    with _lock:
        broker = _brokers.get(key)
        if broker is None:
            broker = _brokers[key] = MemoryBroker(key[1])
        return broker


def backend_from_url(url: str, *, namespace: str = "stem") -> MemoryBackend:
    """The process-wide :class:`MemoryBackend` named by ``url`` in ``namespace``."""
    key = (check_namespace(namespace), _name(url))
    with _lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = MemoryBackend(key[1])
        return backend


def _shared(table: dict[tuple[str, str], T], url: str, namespace: str,
            make: Callable[[str], T]) -> T:
    key = (check_namespace(namespace), _name(url))
    with _lock:
        part = table.get(key)
        if part is None:
            part = table[key] = make(key[1])
        return part


class MemoryStore(BaseStore[MemoryBroker, MemoryBackend]):
    """The process-wide memory broker, backend, lock store and schedule store named by a
    ``memory://NAME`` URL."""

    def __init__(self, url: str = "memory://", *, namespace: str = "stem") -> None:
        super().__init__(url, check_namespace(namespace))
        _name(url)  # refuse a bad URL now, not on first use

    def _make_broker(self) -> MemoryBroker:
        return broker_from_url(self.url, namespace=self.namespace)

    def _make_backend(self) -> MemoryBackend:
        return backend_from_url(self.url, namespace=self.namespace)

    def _make_groups(self) -> MemoryGroupStore:
        return _shared(_groups, self.url, self.namespace, MemoryGroupStore)

    def _make_locks(self) -> MemoryLockStore:
        return _shared(_locks, self.url, self.namespace, MemoryLockStore)

    def _make_schedules(self) -> MemoryScheduleStore:
        return _shared(_schedules, self.url, self.namespace, MemoryScheduleStore)

    def _make_rate_limiter(self) -> MemoryRateLimiter:
        key = (self.namespace, _name(self.url))
        with _lock:
            limiter = _rate_limiters.get(key)
            if limiter is None:
                limiter = _rate_limiters[key] = MemoryRateLimiter(key[1])
            return limiter


def store_from_url(url: str, *, namespace: str = "stem") -> MemoryStore:
    """A :class:`MemoryStore` for ``url`` (the data is shared process-wide by name)."""
    return MemoryStore(url, namespace=namespace)


def reset() -> None:
    """Forget every memory instance, so the next ``memory://`` URL starts empty (for tests)."""
    with _lock:
        _brokers.clear()
        _backends.clear()
        _groups.clear()
        _locks.clear()
        _schedules.clear()
        _rate_limiters.clear()
