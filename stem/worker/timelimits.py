"""Time limits: how a running handler is stopped at its soft and hard limits.

Used by the executor (inline and thread handlers in the worker), by pool children
(:mod:`stem.worker._child`, ``async def`` handlers) and by the process pool (the hard
limit message). It imports nothing else of the worker, so neither does anything here
import the executor or the pool.

A soft limit at or past the hard limit is ignored. Each limit that fires calls the
caller's ``on_timeout(limit, hard)`` once per attempt (the worker sends the
``task_timeout`` signal and logs ``task.timeout`` there).

- **inline** (``async def``, :func:`run_coroutine`): the handler runs in its own
  asyncio task. At the soft limit that task is cancelled and the cancellation is
  replaced, inside the handler, by :class:`~stem.errors.SoftTimeLimitExceeded` (see
  :class:`_SoftLimitDriver`), so ``except SoftTimeLimitExceeded`` sees it and may
  still return a value. At the hard limit the task is cancelled for real; the attempt
  ends with :class:`~stem.errors.TimeLimitExceeded` even if the handler swallows the
  cancellation. A handler that blocks the loop without awaiting cannot be
  interrupted inline at all — give it ``isolation="process"``.
- **thread** (:func:`run_in_thread`): best effort. The soft limit is raised in the
  thread with ``PyThreadState_SetAsyncExc``, which takes effect at the thread's next
  Python bytecode (not inside a blocking C call such as ``time.sleep``). At the hard
  limit the attempt ends with TimeLimitExceeded at once, TimeLimitExceeded is
  injected the same way, and if the thread ignores it, it keeps its pool slot until
  it returns.
- **process**: see :mod:`stem.worker.pool` — the child's own timer raises the soft
  limit in its main thread; at the hard limit the child is killed and replaced.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import Executor as FuturesExecutor
from typing import Any

from stem.envelope import Envelope
from stem.errors import SoftTimeLimitExceeded, TimeLimitExceeded
from stem.log import get_logger

log = get_logger(__name__)

#: How long an inline handler cancelled at its hard limit may take to unwind before
#: the attempt is reported anyway (its ``finally`` blocks usually finish in this time).
INLINE_HARD_GRACE = 0.5

TimeoutCallback = Callable[[float, bool], None]


def soft_limit_message(envelope: Envelope, limit: float) -> str:
    """The SoftTimeLimitExceeded message for one attempt."""
    return f"task {envelope.name} ({envelope.id}) exceeded its soft time limit of {limit:g} s"


def hard_limit_message(envelope: Envelope, limit: float) -> str:
    """The TimeLimitExceeded message for one attempt."""
    return f"task {envelope.name} ({envelope.id}) exceeded its hard time limit of {limit:g} s"


# -- inline: soft limit by cancellation, translated inside the handler ------------------


class _AsyncSoftTimeLimitExceeded(SoftTimeLimitExceeded, asyncio.CancelledError):
    """What an inline handler sees at its soft limit.

    It is a SoftTimeLimitExceeded (and an Exception) for the handler's own
    ``except`` clauses, and a CancelledError for asyncio: ``wait_for``, ``gather``
    and TaskGroups the handler is awaiting unwind it as the cancellation it really
    is, cancelling their children instead of leaking them.
    """


# Handlers, logs and stored errors show the public name.
_AsyncSoftTimeLimitExceeded.__name__ = _AsyncSoftTimeLimitExceeded.__qualname__ = (
    "SoftTimeLimitExceeded")


class _SoftLimitDriver:
    """Runs a coroutine step by step, turning the soft-limit cancellation into an error.

    asyncio can only interrupt a task by cancelling it, and the task then throws a
    fresh CancelledError into the coroutine — the handler would see CancelledError,
    not SoftTimeLimitExceeded. This awaitable sits between the task and the handler's
    coroutine (``send``/``throw`` delegation, what ``await`` does natively) and, when
    :meth:`request` marked the next cancellation as the soft limit, throws
    :class:`_AsyncSoftTimeLimitExceeded` into the handler instead and withdraws the
    cancellation request (``Task.uncancel``) so the handler may carry on. If the
    handler lets it escape, the attempt ends with a plain SoftTimeLimitExceeded.
    """

    __slots__ = ("_coro", "_message")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._message: str | None = None

    def request(self, message: str) -> None:
        """Mark the next cancellation of the running task as the soft limit."""
        self._message = message

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        send: Any = None
        exc: BaseException | None = None
        while True:
            try:
                yielded = coro.send(send) if exc is None else coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            except _AsyncSoftTimeLimitExceeded as soft:
                # Leaving the task as a CancelledError would end it "cancelled".
                raise SoftTimeLimitExceeded(*soft.args).with_traceback(
                    soft.__traceback__) from None
            send, exc = None, None
            try:
                send = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except asyncio.CancelledError as cancelled:
                if self._message is not None:
                    exc = _AsyncSoftTimeLimitExceeded(self._message)
                    self._message = None
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                else:
                    exc = cancelled
            except BaseException as other:
                exc = other


async def _drive(driver: _SoftLimitDriver) -> Any:
    return await driver


async def run_coroutine(
    coro: Coroutine[Any, Any, Any],
    envelope: Envelope,
    *,
    soft: float | None,
    hard: float | None,
    on_timeout: TimeoutCallback,
) -> Any:
    """Await ``coro`` under a soft and/or hard limit (seconds); see the module docstring.

    ``on_timeout(limit, hard)`` is called once for each limit that fires. Used by the
    worker for inline handlers and by pool children for ``async def`` handlers.
    """
    loop = asyncio.get_running_loop()
    driver = _SoftLimitDriver(coro)
    task = loop.create_task(_drive(driver))
    soft_handle: asyncio.TimerHandle | None = None
    if soft is not None:
        def soft_expired() -> None:
            if not task.done():
                on_timeout(soft, False)
                driver.request(soft_limit_message(envelope, soft))
                task.cancel()

        soft_handle = loop.call_later(soft, soft_expired)
    try:
        done, _ = await asyncio.wait({task}, timeout=hard)
    except asyncio.CancelledError:
        task.cancel()  # the worker itself is stopping this attempt
        raise
    finally:
        if soft_handle is not None:
            soft_handle.cancel()
    if done:
        return task.result()
    assert hard is not None
    on_timeout(hard, True)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=INLINE_HARD_GRACE)
    if not done:
        log.warning("task.ignored_cancellation", task_id=envelope.id, task=envelope.name,
                    hint="it keeps running on the loop; use isolation='process' to kill it")
        _keep_until_done(task)
    elif not task.cancelled():
        task.exception()  # retrieved: whatever it ended with, the attempt timed out
    raise TimeLimitExceeded(hard_limit_message(envelope, hard))


_orphans: set[asyncio.Task[Any]] = set()


def _keep_until_done(task: asyncio.Task[Any]) -> None:
    # The loop only holds weak references to tasks; keep a runaway one alive (and its
    # eventual exception retrieved) instead of letting it vanish mid-flight.
    _orphans.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        _orphans.discard(t)
        if not t.cancelled():
            t.exception()

    task.add_done_callback(done)


# -- thread: best-effort asynchronous exceptions ---------------------------------------


class _ThreadSoftTimeLimitExceeded(SoftTimeLimitExceeded):
    """Raised in a thread at its soft limit (the C API instantiates it without arguments)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("soft time limit exceeded",)))


class _ThreadTimeLimitExceeded(TimeLimitExceeded):
    """Raised in a thread at its hard limit, in case it is still listening."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("hard time limit exceeded",)))


_ThreadSoftTimeLimitExceeded.__name__ = _ThreadSoftTimeLimitExceeded.__qualname__ = (
    "SoftTimeLimitExceeded")
_ThreadTimeLimitExceeded.__name__ = _ThreadTimeLimitExceeded.__qualname__ = "TimeLimitExceeded"


class _ThreadRun:
    """One handler call in a pool thread that the loop can raise an exception into."""

    __slots__ = ("_ident", "_lock", "_running", "_sent")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ident: int | None = None
        self._running = False
        self._sent = False

    def __call__(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            self._ident = threading.get_ident()
            self._running = True
        try:
            return fn()
        finally:
            with self._lock:
                self._running = False
                if self._sent and self._ident is not None:
                    # Not raised yet (the handler returned first): don't let it hit
                    # the next task this pool thread runs.
                    _set_async_exc(self._ident, None)

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the thread if the handler is still running there."""
        with self._lock:
            if not self._running or self._ident is None:
                return False
            self._sent = True
            return _set_async_exc(self._ident, exc_type) == 1


def _set_async_exc(ident: int, exc_type: type[BaseException] | None) -> int:
    import ctypes  # only a thread that overran its hard limit needs it

    exc: Any = ctypes.py_object(exc_type) if exc_type is not None else None
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exc))


async def run_in_thread(
    loop: asyncio.AbstractEventLoop,
    threads: FuturesExecutor,
    call: Callable[[], Any],
    envelope: Envelope,
    *,
    soft: float | None,
    hard: float | None,
    on_timeout: TimeoutCallback,
) -> Any:
    """Run ``call`` in ``threads`` under a soft and/or hard limit (see the module docstring)."""
    run = _ThreadRun()
    fut = loop.run_in_executor(threads, run, call)
    soft_handle: asyncio.TimerHandle | None = None
    if soft is not None:
        def soft_expired() -> None:
            if not fut.done():
                on_timeout(soft, False)
                run.interrupt(_ThreadSoftTimeLimitExceeded)

        soft_handle = loop.call_later(soft, soft_expired)
    try:
        done, _ = await asyncio.wait({fut}, timeout=hard)
    finally:
        if soft_handle is not None:
            soft_handle.cancel()
    if done:
        try:
            return fut.result()
        except _ThreadSoftTimeLimitExceeded as exc:
            assert soft is not None  # the handler let it escape: say which limit
            raise SoftTimeLimitExceeded(soft_limit_message(envelope, soft)).with_traceback(
                exc.__traceback__) from None
    assert hard is not None
    on_timeout(hard, True)
    if run.interrupt(_ThreadTimeLimitExceeded):
        log.warning("task.thread_may_keep_running", task_id=envelope.id, task=envelope.name,
                    hint="threads can't be killed; use isolation='process'")
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    raise TimeLimitExceeded(hard_limit_message(envelope, hard))
