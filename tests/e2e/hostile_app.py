"""The app the hardening end-to-end tests run in a real ``stem worker start`` process.

Handlers leave marks in ``$E2E_MARK_DIR`` (as :mod:`tests.e2e.e2e_app` does) so tests
can wait until one has started.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import stem

app = stem.Stem("hostile")


def _mark(kind: str, task_id: str) -> None:
    path = Path(os.environ["E2E_MARK_DIR"]) / f"{kind}-{task_id}"
    with path.open("a") as fh:
        fh.write(f"{os.getpid()} {time.time():.6f}\n")


@app.task(name="h.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="h.fail")
async def fail() -> None:
    raise RuntimeError("always")


@app.task(name="h.far")
async def far() -> None:
    raise stem.Retry(countdown=1e300)


@app.task(name="h.slow")
async def slow(ctx: stem.TaskContext, seconds: float) -> str:
    _mark("slow", ctx.id)
    await asyncio.sleep(seconds)
    return "slept"
