"""``ResultBackend.wait`` written once: arm, read, sleep until changed, read again.

Every backend's ``wait`` is this loop; an adapter supplies only how to watch a task
(:class:`Watch`: how a change is noticed — an in-process wake-up, a pub/sub message,
LISTEN/NOTIFY, a shared poll) and how to read its status. The watch is armed
before the first read, so a write that lands between the read and the sleep wakes
the waiter instead of being missed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from stem.adapters._shared import Waiter
from stem.status import TaskStatus


class Watch(Protocol):
    """One ``wait()``'s subscription to a task's status changes."""

    async def changed(self, seconds: float | None) -> TaskStatus | bool:
        """Sleep until a change or ``seconds`` (None: no limit).

        Returns the new status when the notification carried it, True when the status
        should be read again, False when nothing happened.
        """
        ...

    async def close(self) -> None:
        """Stop watching."""
        ...


async def wait_for_terminal(
    arm: Callable[[], Awaitable[Watch]],
    read: Callable[[], Awaitable[TaskStatus | None]],
    timeout: float | None,
) -> TaskStatus | None:
    """The terminal status once stored, or None when ``timeout`` passes first."""
    loop = asyncio.get_running_loop()
    give_up = None if timeout is None else loop.time() + timeout
    watch = await arm()
    try:
        status = await read()
        while True:
            if status is not None and status.state.is_terminal:
                return status
            remaining = None if give_up is None else give_up - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            got = await watch.changed(remaining)
            if isinstance(got, TaskStatus):
                status = got
            elif got:
                status = await read()
    finally:
        await watch.close()


class ResultWaiters:
    """Waiters by task id, woken from any thread (a backend's in-process wake-ups)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, set[Waiter]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def watch(self, task_id: str) -> LocalWatch:
        """A :class:`Watch` on ``task_id`` (armed now)."""
        return LocalWatch(self, task_id)

    def ids(self) -> list[str]:
        """Task ids someone is waiting for."""
        with self._lock:
            return list(self._by_id)

    def wake(self, task_ids: Sequence[str]) -> None:
        """Wake the waiters of ``task_ids``."""
        if not self._by_id:
            return
        with self._lock:
            woken = [w for i in task_ids for w in self._by_id.get(i, ())]
        for w in woken:
            w.wake()

    def _add(self, task_id: str, old: Waiter | None) -> Waiter:
        w = Waiter()
        with self._lock:
            waiters = self._by_id.setdefault(task_id, set())
            if old is not None:
                waiters.discard(old)
            waiters.add(w)
        return w

    def _remove(self, task_id: str, w: Waiter) -> None:
        with self._lock:
            waiters = self._by_id.get(task_id)
            if waiters is not None:
                waiters.discard(w)
                if not waiters:
                    del self._by_id[task_id]


class LocalWatch:
    """A :class:`Watch` woken through :class:`ResultWaiters`."""

    def __init__(self, registry: ResultWaiters, task_id: str) -> None:
        self._registry = registry
        self._task_id = task_id
        self._waiter = registry._add(task_id, None)

    async def changed(self, seconds: float | None) -> bool:
        woken = await self._waiter.wait(seconds)
        if woken:
            self._waiter = self._registry._add(self._task_id, self._waiter)  # re-arm
        return woken

    async def close(self) -> None:
        self._registry._remove(self._task_id, self._waiter)
