"""In-process result backend: a dict of encoded statuses with expiry times."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from stem._time import now_epoch
from stem.adapters._shared import check_max_items, meta_appended
from stem.adapters._waiting import ResultWaiters, Watch, wait_for_terminal
from stem.ports import DEFAULT_RESULT_TTL
from stem.status import TaskStatus

#: How often (seconds) a write also sweeps expired entries out of memory.
SWEEP_INTERVAL = 30.0


class MemoryBackend:
    """A :class:`stem.ports.ResultBackend` for one process.

    Statuses are kept as their JSON bytes, so a caller gets a fresh object on every
    read and a result that could not be stored by a real backend fails here too.
    ``wait()`` is woken directly by ``set_many``; nothing polls. Thread-safe.
    """

    def __init__(self, name: str = "default", *, default_ttl: float = DEFAULT_RESULT_TTL) -> None:
        self.name = name
        self.default_ttl = default_ttl
        self._lock = threading.Lock()
        self._data: dict[str, tuple[bytes, float]] = {}
        self._waiters = ResultWaiters()
        self._next_sweep = now_epoch() + SWEEP_INTERVAL

    def __repr__(self) -> str:
        return f"MemoryBackend({self.name!r})"

    def _read(self, task_id: str, now: float) -> TaskStatus | None:
        entry = self._data.get(task_id)
        if entry is None or entry[1] <= now:
            return None
        return TaskStatus.from_json(entry[0])

    async def ping(self) -> None:
        """Always reachable."""

    async def set_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> None:
        """Store statuses; terminal ones wake their waiters."""
        now = now_epoch()
        rows = [
            (
                s.id,
                s.to_json(),
                now + (self.default_ttl if ttl is None else ttl),
                s.state.is_terminal,
            )
            for s, ttl in items
        ]
        with self._lock:
            for task_id, raw, expires, _ in rows:
                self._data[task_id] = (raw, expires)
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_INTERVAL
                for key in [k for k, (_, exp) in self._data.items() if exp <= now]:
                    del self._data[key]
        self._waiters.wake([task_id for task_id, _, _, terminal in rows if terminal])

    async def add_many(self, items: Sequence[tuple[TaskStatus, float | None]]) -> set[str]:
        """Store each status whose id has none (or an expired one); return those ids."""
        now = now_epoch()
        added: set[str] = set()
        with self._lock:
            for s, ttl in items:
                entry = self._data.get(s.id)
                if (entry is None or entry[1] <= now) and s.id not in added:
                    self._data[s.id] = (
                        s.to_json(), now + (self.default_ttl if ttl is None else ttl))
                    added.add(s.id)
        self._waiters.wake([s.id for s, _ in items if s.id in added and s.state.is_terminal])
        return added

    async def forget_many(self, task_ids: Sequence[str]) -> None:
        """Delete these statuses."""
        with self._lock:
            for task_id in task_ids:
                self._data.pop(task_id, None)

    async def get(self, task_id: str) -> TaskStatus | None:
        """The stored status, or None if unknown or expired."""
        with self._lock:
            return self._read(task_id, now_epoch())

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        """Statuses of the ids that exist and have not expired."""
        now = now_epoch()
        with self._lock:
            found = [(i, self._data.get(i)) for i in task_ids]
        return {i: TaskStatus.from_json(e[0]) for i, e in found if e is not None and e[1] > now}

    async def append_meta(self, task_id: str, key: str, item: dict[str, Any], *,
                          max_items: int = 100) -> bool:
        """Append ``item`` to ``meta[key]`` under the lock; the expiry stays."""
        check_max_items(max_items)
        with self._lock:
            entry = self._data.get(task_id)
            if entry is None or entry[1] <= now_epoch():
                return False
            self._data[task_id] = (meta_appended(entry[0], key, item, max_items), entry[1])
        return True

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus | None:
        """Return the terminal status as soon as ``set_many`` stores one, else None on timeout."""

        async def arm() -> Watch:
            return self._waiters.watch(task_id)

        return await wait_for_terminal(arm, lambda: self.get(task_id), timeout)

    async def close(self) -> None:
        """Nothing to release: the data lives as long as the process (see ``memory://NAME``)."""
