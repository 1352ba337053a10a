"""In-process revoke store: the entries of one ``memory://NAME`` in a dict."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime

from stem._time import utcnow
from stem.revoke import RevokeEntry


class MemoryRevokeStore:
    """A :class:`stem.ports.RevokeStore` in this process (shared by name, thread-safe)."""

    def __init__(self, name: str = "default", namespace: str = "stem") -> None:
        self.name = name
        self.namespace = namespace
        self._entries: dict[str, RevokeEntry] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryRevokeStore({self.name!r})"

    async def upsert_many(self, entries: Sequence[RevokeEntry]) -> None:
        with self._lock:
            for e in entries:
                cur = self._entries.get(e.task_id)
                if cur is None or e.version > cur.version:
                    self._entries[e.task_id] = e.with_namespace(self.namespace)

    async def entries(self) -> list[RevokeEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.version)

    async def changed_since(self, version: int) -> list[RevokeEntry]:
        with self._lock:
            return sorted((e for e in self._entries.values() if e.version > version),
                          key=lambda e: e.version)

    async def prune_expired(self, now: datetime | None = None) -> int:
        at = now or utcnow()
        with self._lock:
            gone = [k for k, e in self._entries.items() if e.is_expired(at)]
            for k in gone:
                del self._entries[k]
        return len(gone)

    async def close(self) -> None:
        """Keeps the data: other users of the instance may still read it."""
