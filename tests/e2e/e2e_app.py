"""The app the end-to-end tests run in a real ``stem worker start`` subprocess.

Handlers leave marks (one line per start) in ``$E2E_MARK_DIR`` so tests can see
which process ran what, and when.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import stem

app = stem.Stem("e2e")


def _mark(kind: str, task_id: str) -> None:
    path = Path(os.environ["E2E_MARK_DIR"]) / f"{kind}-{task_id}"
    with path.open("a") as fh:
        fh.write(f"{os.getpid()} {time.time():.6f}\n")


@app.task(name="e2e.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="e2e.flaky", max_retries=3,
          retry_strategy=stem.ExponentialJitterRetryStrategy(base=0.2, jitter=False))
def flaky(ctx: stem.TaskContext) -> None:
    _mark("flaky", ctx.id)
    raise RuntimeError(f"failed attempt {ctx.attempt}")


@app.task(name="e2e.slow", visibility_timeout=1.5)
async def slow(ctx: stem.TaskContext, seconds: float) -> int:
    _mark("slow", ctx.id)
    await asyncio.sleep(seconds)
    return os.getpid()


@app.task(name="e2e.work", visibility_timeout=2.0)
async def work(ctx: stem.TaskContext, seconds: float) -> int:
    _mark("start", ctx.id)
    await asyncio.sleep(seconds)
    _mark("done", ctx.id)
    return os.getpid()


@app.task(name="e2e.gc")
async def gc_settings() -> list[int]:
    """The worker process's collector: [first-generation threshold, frozen objects]."""
    return [gc.get_threshold()[0], gc.get_freeze_count()]
