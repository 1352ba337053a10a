"""In-process control channel and heartbeat store (``memory://NAME``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from stem._aio import wait_event

#: Messages the in-process log keeps (older ones are dropped).
KEEP = 1000


class MemoryControlChannel:
    """A :class:`stem.ports.ControlChannel` in this process (shared by name, any loop)."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._log: deque[tuple[int, bytes]] = deque(maxlen=KEEP)
        self._last = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def __repr__(self) -> str:
        return f"MemoryControlChannel({self.name!r})"

    async def position(self) -> str:
        with self._lock:
            return str(self._last)

    async def publish(self, message: bytes) -> None:
        with self._lock:
            self._last += 1
            self._log.append((self._last, message))
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def _after(self, after: int) -> tuple[str, list[bytes]]:
        msgs = [m for i, m in self._log if i > after]
        return str(max(after, self._last)), msgs

    async def read(self, after: str, timeout: float) -> tuple[str, list[bytes]]:
        start = int(after)
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            pos, msgs = self._after(start)
            if msgs or timeout <= 0:
                return pos, msgs
            self._waiters.add(waiter)
        try:
            await wait_event(waiter[1], timeout)
        finally:
            with self._lock:
                self._waiters.discard(waiter)
                pos, msgs = self._after(start)
        return pos, msgs

    async def close(self) -> None:
        """Keeps the log: other users of the instance may still read it."""


class MemoryHeartbeatStore:
    """A :class:`stem.ports.HeartbeatStore` in this process."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._beats: dict[str, tuple[bytes, float]] = {}

    async def put(self, worker_id: str, heartbeat: bytes, ttl: float) -> None:
        with self._lock:
            self._beats[worker_id] = (heartbeat, time.time() + ttl)

    async def current(self) -> list[bytes]:
        now = time.time()
        with self._lock:
            for k in [k for k, (_, exp) in self._beats.items() if exp <= now]:
                del self._beats[k]
            return [b for b, _ in self._beats.values()]

    async def remove(self, worker_id: str) -> None:
        with self._lock:
            self._beats.pop(worker_id, None)

    async def close(self) -> None:
        """Keeps the data."""
