"""The in-process rate limiter: GCRA state in a dict, shared by every store of one
``memory://NAME`` in the process (like the broker and backend)."""

from __future__ import annotations

import threading
import time

from stem.ports import RateLimitDecision
from stem.ratelimit import gcra_many


class MemoryRateLimiter:
    """:class:`stem.ports.RateLimiter` for one process (the wall clock, a lock)."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._tat: dict[str, float] = {}
        # The sync API's loop runs on another thread: one lock makes each step atomic.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryRateLimiter({self.name!r})"

    async def acquire(self, key: str, limit: int, period: float, *, max_wait: float = 0.0
                      ) -> RateLimitDecision:
        return (await self.acquire_many(key, limit, period, 1, max_wait=max_wait))[0]

    async def acquire_many(self, key: str, limit: int, period: float, count: int, *,
                           max_wait: float = 0.0) -> list[RateLimitDecision]:
        with self._lock:
            now = time.time()
            new_tat, decisions = gcra_many(self._tat.get(key), now, limit, period, count,
                                           max_wait)
            if new_tat is not None:
                self._tat[key] = new_tat
            if len(self._tat) > 10_000:  # forget keys whose state is back to "fresh"
                for k in [k for k, t in self._tat.items() if t < now]:
                    del self._tat[k]
            return decisions

    async def close(self) -> None:
        """Nothing to release: the state lives as long as the process (or reset())."""
