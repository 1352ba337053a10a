"""Where handlers run — inline, in a thread, or in a process pool.

Choosing the isolation is one rule, :func:`stem.task.isolation_for`, which
``stem tasks ls`` shows too: an explicit ``TaskOptions.isolation`` always wins.
Otherwise ``async def`` handlers run inline on the worker's event loop and ``def``
handlers in a thread pool — except that a ``def`` handler with a hard time limit (from
its options, ``with_options`` or ``Retry(time_limit=...)``) runs in the process pool,
because a thread cannot be killed and a hard limit must stop the handler whatever it
does. A worker started with ``--pool N`` (``Worker(pool_size=N)``) runs every ``def``
handler without explicit isolation in the pool, like Celery's prefork pool; ``async
def`` handlers stay inline there (they cooperate, so they need no process to be
stopped), unless they ask for ``isolation="process"``. A ``def`` handler with an
explicit ``isolation="inline"`` runs on the loop itself — no thread hop, but it blocks
the loop and no limit can stop it.

Time limits (``soft_time_limit``, ``time_limit``; per-call overrides in envelope meta
win, see :func:`~stem.worker.processor.effective_limits`) are enforced by
:mod:`stem.worker.timelimits` (inline and thread) and :mod:`stem.worker.pool`
(process). Each limit that fires sends the ``task_timeout`` signal once per attempt
(``hard=False`` / ``hard=True``) and logs ``task.timeout``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from stem import signals, tracing
from stem.context import TaskContext
from stem.envelope import Envelope
from stem.errors import ConfigurationError
from stem.log import get_logger
from stem.task import Isolation, TaskDefinition, isolation_for
from stem.worker.pool import PoolConfig, ProcessPool
from stem.worker.processor import Prepared, effective_limits
from stem.worker.timelimits import TimeoutCallback, run_coroutine, run_in_thread

if TYPE_CHECKING:
    from stem.app import Stem

log = get_logger(__name__)


# -- the executor ------------------------------------------------------------------------


class Executor:
    """Runs a prepared task's handler with the right isolation and limits; returns its value.

    ``threads`` sizes the thread pool. ``pool`` configures the process pool (created
    when a task first needs it, or at :meth:`start` when one is known to);
    ``pool_default`` sends ``def`` handlers without explicit isolation to it.
    ``sender`` is what ``task_timeout`` signals are sent by (the worker).
    """

    def __init__(
        self,
        *,
        threads: int,
        app: Stem | None = None,
        pool: PoolConfig | None = None,
        pool_default: bool = False,
        sender: Any = None,
    ) -> None:
        self._threads = threads
        self._thread_pool: ThreadPoolExecutor | None = None
        self._app = app
        self._pool_config = pool
        self._pool_default = pool_default
        self._pool: ProcessPool | None = None
        self._sender = sender if sender is not None else self

    @property
    def process_pool(self) -> ProcessPool | None:
        """The process pool, once started."""
        return self._pool

    def isolation_for(self, definition: TaskDefinition[Any, Any], hard: float | None) -> Isolation:
        """Where an attempt with hard limit ``hard`` runs here (:func:`stem.task.isolation_for`)."""
        return isolation_for(definition, hard, self._pool_default)

    async def start(self) -> None:
        """Start the process pool now (and wait for it) when some registered task will use it."""
        if self._app is None:
            return
        needed = self._pool_default or any(
            self.isolation_for(d, d.options.time_limit) == "process"
            for d in self._app.tasks.values()
            if d.func is not None
        )
        if needed:
            try:
                await self._ensure_pool().start()
            except BaseException:
                await self.close()
                raise

    def _ensure_pool(self) -> ProcessPool:
        if self._pool is None:
            if self._app is None:
                raise ConfigurationError("isolation='process' needs a worker with an app")
            config = self._pool_config or PoolConfig(size=min(os.cpu_count() or 1, self._threads))
            self._pool = ProcessPool(self._app, config)
        return self._pool

    def _timeout_callback(self, envelope: Envelope) -> TimeoutCallback:
        sender = self._sender

        def on_timeout(limit: float, hard: bool) -> None:
            log.warning("task.timeout", task_id=envelope.id, task=envelope.name, limit=limit,
                        hard=hard)
            signals.task_timeout.send(sender, envelope=envelope, limit=limit, hard=hard)

        return on_timeout

    async def execute(self, prepared: Prepared, ctx: TaskContext) -> Any:
        """Run the handler; its exceptions (and limit errors) propagate to the caller."""
        definition = prepared.definition
        env = prepared.envelope
        soft, hard = effective_limits(env, definition)
        if soft is not None and hard is not None and soft >= hard:
            soft = None
        isolation = self.isolation_for(definition, hard)
        if isolation == "process":
            pool = self._ensure_pool()
            return await pool.run(prepared, ctx, soft=soft, hard=hard,
                                  on_timeout=self._timeout_callback(env))
        func = definition.func
        assert func is not None
        args = [ctx, *prepared.args] if definition.takes_context else prepared.args
        if definition.is_async:
            if isolation != "inline":
                raise ConfigurationError(
                    f"task {definition.name!r}: async handlers run inline or in the process "
                    f"pool, not with isolation={isolation!r}"
                )
            if soft is None and hard is None:
                return await func(*args, **prepared.kwargs)
            return await run_coroutine(func(*args, **prepared.kwargs), env, soft=soft,
                                       hard=hard, on_timeout=self._timeout_callback(env))
        if isolation == "inline":
            return func(*args, **prepared.kwargs)  # asked for: blocks the loop while it runs
        if self._thread_pool is None:
            self._thread_pool = ThreadPoolExecutor(self._threads, thread_name_prefix="stem-task")
        loop = asyncio.get_running_loop()
        call = functools.partial(func, *args, **prepared.kwargs)
        if tracing.ENABLED and tracing.active():  # the execute span stays current there
            call = functools.partial(contextvars.copy_context().run, call)
        if soft is None and hard is None:
            return await loop.run_in_executor(self._thread_pool, call)
        return await run_in_thread(loop, self._thread_pool, call, env, soft=soft, hard=hard,
                                   on_timeout=self._timeout_callback(env))

    async def close(self) -> None:
        """Stop the process pool and the thread pool (running threads finish on their own)."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False, cancel_futures=True)
            self._thread_pool = None
