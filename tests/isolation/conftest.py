"""Fixtures for the isolation tests: a fresh app per test, marks, recorded timeouts."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import stem
from stem import signals
from stem.worker import Worker
from stem.worker.pool import ProcessPool
from tests.helpers import eventually
from tests.isolation.iso_app import make_app

T = TypeVar("T")


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return make_app(f"memory://{namespace}")


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder handlers write marks to (set before pool children start: they inherit it)."""
    folder = tmp_path / "marks"
    folder.mkdir()
    monkeypatch.setenv("ISO_MARK_DIR", str(folder))
    return folder


@pytest.fixture
def timeouts() -> Iterator[list[tuple[str, float, bool]]]:
    """Every ``task_timeout`` signal sent during the test: (task id, limit, hard)."""
    seen: list[tuple[str, float, bool]] = []

    def receiver(sender: Any, *, envelope: stem.Envelope, limit: float, hard: bool,
                 **_: Any) -> None:
        seen.append((envelope.id, limit, hard))

    signals.task_timeout.connect(receiver)
    yield seen
    signals.task_timeout.disconnect(receiver)


def read_marks(marks: Path, kind: str, task_id: str) -> list[tuple[int, float]]:
    """``(pid, epoch time)`` for each time a handler left a ``kind`` mark for ``task_id``."""
    path = marks / f"{kind}-{task_id}"
    if not path.exists():
        return []
    return [(int(p), float(t)) for p, t in (line.split() for line in path.read_text().split("\n")
                                            if line)]


async def until(check: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll a plain function until it returns something truthy (or fail after ``timeout``)."""
    async def probe() -> T:
        return check()

    return await eventually(probe, timeout=timeout)


async def ready_pool(worker: Worker) -> ProcessPool:
    """The worker's pool once all its children are up (a worker starts it before fetching,
    so timing measured after this excludes the start-up)."""
    def ready() -> bool:
        pool = worker.executor.process_pool
        return pool is not None and pool.ready_count == pool.config.size

    await until(ready, timeout=30)
    pool = worker.executor.process_pool
    assert pool is not None
    return pool


def alive(pid: int) -> bool:
    """True while a process with ``pid`` exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def monotonic_since(epoch: float) -> float:
    """Seconds elapsed since the wall-clock time ``epoch`` (marks are wall-clock)."""
    return time.time() - epoch
