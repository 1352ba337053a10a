"""Tasks for the isolation tests.

``make_app(url)`` builds a fresh app per test (its own memory/SQLite namespace);
the module-level ``app`` is what pool children import (``tests.isolation.iso_app:app``)
— same task names, same handlers, and children never touch the broker anyway.
Handlers that can't report back (killed, crashed) leave marks in ``$ISO_MARK_DIR``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import stem

if os.environ.get("ISO_FAIL_IN_CHILD") and "stem.worker._child" in sys.modules:
    raise RuntimeError("this app refuses to load in a pool child")

SPEC = "tests.isolation.iso_app:app"
FAST_RETRY = stem.ExponentialJitterRetryStrategy(base=0.05, jitter=False)

_hog: list[bytes] = []


def mark(kind: str, task_id: str) -> None:
    """Append ``pid time`` to the mark file ``kind-task_id`` (when marks are enabled)."""
    folder = os.environ.get("ISO_MARK_DIR")
    if folder:
        with (Path(folder) / f"{kind}-{task_id}").open("a") as fh:
            fh.write(f"{os.getpid()} {time.time():.6f}\n")


def add(x: int, y: int) -> int:
    return x + y


def pid() -> int:
    return os.getpid()


def spin(ctx: stem.TaskContext) -> None:
    mark("spin", ctx.id)
    while True:
        pass


def stubborn(ctx: stem.TaskContext) -> None:
    """Ignores SIGTERM's SystemExit: only SIGKILL stops it."""
    mark("stubborn", ctx.id)
    while True:
        try:
            while True:
                pass
        except BaseException:
            continue


async def forever(ctx: stem.TaskContext) -> None:
    mark("forever", ctx.id)
    await asyncio.Event().wait()


async def swallow_cancel(ctx: stem.TaskContext) -> str:
    """Swallows cancellation and returns: the attempt still ends with TimeLimitExceeded."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    return "ignored the cancellation"


def soft_sync(ctx: stem.TaskContext, busy: bool = True) -> dict[str, Any]:
    started = time.monotonic()
    try:
        while True:
            if not busy:
                time.sleep(0.01)
    except stem.SoftTimeLimitExceeded as exc:
        return {"caught": type(exc).__name__, "after": time.monotonic() - started,
                "pid": os.getpid(), "message": str(exc)}


async def soft_async(ctx: stem.TaskContext) -> dict[str, Any]:
    started = time.monotonic()
    try:
        await asyncio.sleep(30)
    except stem.SoftTimeLimitExceeded as exc:
        await asyncio.sleep(0.01)  # the handler can still await while cleaning up
        return {"caught": type(exc).__name__, "after": time.monotonic() - started,
                "pid": os.getpid()}
    return {"caught": None}


async def soft_async_gather(ctx: stem.TaskContext) -> str:
    """The soft limit reaches the handler through a gather; the children are cancelled."""
    children = [asyncio.ensure_future(asyncio.sleep(30)) for _ in range(2)]
    try:
        await asyncio.gather(*children)
    except stem.SoftTimeLimitExceeded:
        await asyncio.sleep(0)
        return "cancelled" if all(c.cancelled() for c in children) else "leaked"
    return "finished"


def soft_ignored(ctx: stem.TaskContext) -> None:
    """Lets the soft limit escape: the attempt fails with SoftTimeLimitExceeded."""
    while True:
        pass


def crash_exit(ctx: stem.TaskContext) -> None:
    mark("crash", ctx.id)
    os._exit(1)


def crash_segv(ctx: stem.TaskContext) -> None:
    mark("crash", ctx.id)
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)


def boom() -> None:
    raise ValueError("boom from the child")


def retry_once(ctx: stem.TaskContext) -> int:
    if ctx.attempt == 0:
        raise stem.Retry(countdown=0.01, exc=KeyError("first"))
    return ctx.attempt


def retry_with_limit(ctx: stem.TaskContext) -> str:
    """Attempt 0 asks for a 0.5 s hard limit on the next attempt, which then spins."""
    if ctx.attempt == 0:
        raise stem.Retry(countdown=0, time_limit=0.5)
    while True:
        pass


def report(ctx: stem.TaskContext) -> str:
    ctx.meta["written"] = "in the child"
    ctx.progress(50, data={"step": "half"})
    ctx.heartbeat()
    return ctx.enqueue_sync("iso.add", 1, y=2)


async def report_async(ctx: stem.TaskContext) -> dict[str, Any]:
    child = await ctx.enqueue("iso.add", x=2, y=3)
    return {"child": child, "pid": os.getpid()}


async def async_pid() -> int:
    await asyncio.sleep(0)
    return os.getpid()


def not_json() -> object:
    return {1, 2}


def hog(mb: int) -> int:
    _hog.append(b"x" * (mb << 20))
    return os.getpid()


def sleepy(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def nap(ctx: stem.TaskContext, seconds: float) -> int:
    mark("nap", ctx.id)
    time.sleep(seconds)
    return os.getpid()


def cleanup(ctx: stem.TaskContext, seconds: float = 30) -> None:
    """Blocks in a system call; its ``finally`` block leaves a mark when it is stopped."""
    mark("cleanup-start", ctx.id)
    try:
        time.sleep(seconds)
    finally:
        mark("cleanup", ctx.id)


_SIGNAL_STATE = """
import json, signal
def how(sig):
    h = signal.getsignal(sig)
    return {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored",
            signal.default_int_handler: "KeyboardInterrupt"}.get(h, repr(h))
print(json.dumps({"term": how(signal.SIGTERM), "int": how(signal.SIGINT),
                  "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))}))
"""


def subprocess_signals() -> dict[str, Any]:
    """How a process the task starts inherits SIGTERM/SIGINT (handler as Python sees it, mask)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", _SIGNAL_STATE], capture_output=True,
                         check=True, timeout=30)
    state: dict[str, Any] = json.loads(out.stdout)
    return state


def judged(kind: str) -> None:
    """Fails in a way the parent's retry rules must recognise without the class."""
    if kind == "reject":
        raise stem.Reject("refused in the child", dead_letter=True)
    if kind == "fatal":
        raise _Fatal("not worth retrying")
    if kind == "missing":
        raise FileNotFoundError("filtered out by dont_autoretry_for")
    raise ConnectionResetError("retried: an OSError")


class _Fatal(Exception):
    stem_retryable = False


NO_WAIT = stem.RetryPolicy(default_delay=0)


def make_app(broker: str = "memory://iso-default", backend: str | None = None) -> stem.Stem:
    """An app with every test task registered (explicit names, so children match)."""
    app = stem.Stem("iso", broker=broker, backend=backend or broker)
    proc: dict[str, Any] = {"isolation": "process"}
    app.task(name="iso.add", **proc)(add)
    app.task(name="iso.pid", **proc)(pid)
    app.task(name="iso.thread_pid")(pid)
    app.task(name="iso.spin", time_limit=1, max_retries=1, retry_strategy=FAST_RETRY)(spin)
    app.task(name="iso.stubborn", time_limit=0.5)(stubborn)
    app.task(name="iso.forever", time_limit=1)(forever)
    app.task(name="iso.swallow_cancel", time_limit=0.3)(swallow_cancel)
    app.task(name="iso.soft_sync", soft_time_limit=0.5, time_limit=5)(soft_sync)
    app.task(name="iso.soft_sync_thread", soft_time_limit=0.3, isolation="thread")(soft_sync)
    app.task(name="iso.soft_async", soft_time_limit=0.3)(soft_async)
    app.task(name="iso.soft_async_proc", soft_time_limit=0.3, **proc)(soft_async)
    app.task(name="iso.soft_async_gather", soft_time_limit=0.2)(soft_async_gather)
    app.task(name="iso.soft_ignored", soft_time_limit=0.2, time_limit=3)(soft_ignored)
    app.task(name="iso.crash_exit", **proc)(crash_exit)
    app.task(name="iso.crash_segv", **proc)(crash_segv)
    app.task(name="iso.boom", **proc)(boom)
    app.task(name="iso.retry_once", max_retries=1, **proc)(retry_once)
    app.task(name="iso.retry_with_limit", max_retries=1)(retry_with_limit)
    app.task(name="iso.report", **proc)(report)
    app.task(name="iso.report_async", **proc)(report_async)
    app.task(name="iso.async_pid", **proc)(async_pid)
    app.task(name="iso.not_json", **proc)(not_json)
    app.task(name="iso.hog", **proc)(hog)
    app.task(name="iso.sleepy", **proc)(sleepy)
    app.task(name="iso.sleepy_default")(sleepy)
    app.task(name="iso.nap", **proc)(nap)
    app.task(name="iso.cleanup", time_limit=0.5)(cleanup)
    app.task(name="iso.judged", max_retries=1, retry_policy=NO_WAIT, autoretry_for=(OSError,),
             dont_autoretry_for=(FileNotFoundError,), **proc)(judged)
    app.task(name="iso.subprocess_signals", **proc)(subprocess_signals)
    return app


app = make_app(os.environ.get("ISO_BROKER_URL", "memory://iso-default"))
