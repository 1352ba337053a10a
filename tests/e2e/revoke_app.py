"""The app of the revoke process tests: tasks that leave a mark file when they run, and
tasks that run until stopped (in the process pool, inline async, in a thread with
heartbeats)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import stem

app = stem.Stem("revoke-e2e")


def mark(kind: str, task_id: str) -> None:
    """Append ``<pid> <time>`` to ``$E2E_MARK_DIR/<kind>-<task_id>``."""
    with (Path(os.environ["E2E_MARK_DIR"]) / f"{kind}-{task_id}").open("a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")


@app.task(name="rv.work")
async def work(ctx: stem.TaskContext) -> str:
    mark("ran", ctx.id)
    return "done"


@app.task(name="rv.spin_process", isolation="process")
def spin_process(ctx: stem.TaskContext) -> None:
    mark("started", ctx.id)
    while True:  # pure CPU: only killing its process stops it
        pass


@app.task(name="rv.spin_async")
async def spin_async(ctx: stem.TaskContext) -> None:
    mark("started", ctx.id)
    await asyncio.Event().wait()


@app.task(name="rv.spin_thread")
def spin_thread(ctx: stem.TaskContext) -> None:
    mark("started", ctx.id)
    while True:
        ctx.heartbeat()
        time.sleep(0.05)


@app.task(name="rv.other", queue="other")
async def other(ctx: stem.TaskContext) -> str:
    mark("ran", ctx.id)
    return "other"


@app.task(name="rv.sleep")
async def sleep(ctx: stem.TaskContext, seconds: float) -> int:
    mark("started", ctx.id)
    await asyncio.sleep(seconds)
    mark("finished", ctx.id)
    return os.getpid()
