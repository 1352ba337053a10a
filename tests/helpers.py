"""Test helpers: poll-with-deadline instead of sleeps, and an in-process worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from stem.app import Stem
from stem.testing import eventually as eventually  # re-exported for the tests
from stem.worker import Worker

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Sync twin of :func:`eventually` (stem.testing.eventually, which the suite shares
    with the conformance checks)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


@asynccontextmanager
async def running_worker(app: Stem, **kwargs: Any) -> AsyncIterator[Worker]:
    """Run a Worker for ``app`` in this loop for the duration of the block."""
    kwargs.setdefault("block_time", 0.1)
    kwargs.setdefault("shutdown_grace", 5.0)
    worker = Worker(app, **kwargs)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 15)


class WorkerProcesses:
    """Real ``stem worker start`` processes for one test; survivors are SIGKILLed at the end."""

    ROOT = Path(__file__).resolve().parents[1]

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, app_spec: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a worker for ``app_spec`` with ``env`` added to this process's environment."""
        log = (self.log_dir / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "stem_cli", "worker", "start", "--app", app_spec,
             "--block-time", "0.1", *args],
            cwd=self.ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        """SIGKILL and reap every worker still running."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)


@contextmanager
def capture_stem_logs(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Collect the structured events Stem logs (``{"event": ..., "log_level": ..., ...}``).

    Stem logs through the standard library (stem.log), so this attaches a handler to
    the ``stem`` logger for the duration and restores its level afterwards.
    """
    from stem.log import EVENT_ATTR

    events: list[dict[str, Any]] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, EVENT_ATTR, None) or {"event": record.getMessage()}
            events.append({**fields, "log_level": record.levelname.lower(),
                           "logger": record.name})

    logger = logging.getLogger("stem")
    handler, old = _Collect(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
