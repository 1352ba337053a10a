"""In-process lock store: leased locks with an owner, for one process (tests, one beat)."""

from __future__ import annotations

import threading
import time

from stem.adapters._beat import check_ttl


class MemoryLockStore:
    """A :class:`stem.ports.LockStore` in a dict; thread-safe, shared by name in a process.

    Lease times use the monotonic clock: nothing outside this process reads them.
    """

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}  # key -> (owner, monotonic expiry)

    def __repr__(self) -> str:
        return f"MemoryLockStore({self.name!r})"

    def _live(self, key: str, now: float) -> str | None:
        held = self._held.get(key)
        if held is None:
            return None
        if held[1] <= now:
            del self._held[key]
            return None
        return held[0]

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take ``key`` for ``owner`` for ``ttl`` seconds if free, expired or already its own."""
        seconds = check_ttl(ttl)
        now = time.monotonic()
        with self._lock:
            current = self._live(key, now)
            if current is not None and current != owner:
                return False
            self._held[key] = (owner, now + seconds)
            return True

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s unexpired lock; False when it does not hold it."""
        seconds = check_ttl(ttl)
        now = time.monotonic()
        with self._lock:
            if self._live(key, now) != owner:
                return False
            self._held[key] = (owner, now + seconds)
            return True

    async def release(self, key: str, owner: str) -> bool:
        """Free ``key`` if ``owner`` holds it."""
        with self._lock:
            if self._live(key, time.monotonic()) != owner:
                return False
            del self._held[key]
            return True

    async def owner_of(self, key: str) -> str | None:
        """Who holds ``key`` now."""
        with self._lock:
            return self._live(key, time.monotonic())

    async def close(self) -> None:
        """Nothing to close (the data outlives it, like the memory broker's)."""
