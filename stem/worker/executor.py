"""Where handlers run: inline on the event loop, or in a thread pool."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stem.context import TaskContext
from stem.errors import ConfigurationError
from stem.worker.processor import Prepared


class Executor:
    """Runs a prepared task's handler with the right isolation and returns its value."""

    def __init__(self, *, threads: int) -> None:
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    async def execute(self, prepared: Prepared, ctx: TaskContext) -> Any:
        """Run the handler; its exceptions propagate to the caller."""
        definition = prepared.definition
        func = definition.func
        assert func is not None
        args = [ctx, *prepared.args] if definition.takes_context else prepared.args
        isolation = definition.effective_isolation
        if definition.is_async:
            if isolation != "inline":
                raise ConfigurationError(
                    f"task {definition.name!r}: isolation={isolation!r} is not available "
                    "for async handlers in this worker"
                )
            return await func(*args, **prepared.kwargs)
        if isolation == "process":
            raise ConfigurationError(
                f"task {definition.name!r}: isolation='process' needs the process pool"
            )
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="stem-task")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(func, *args, **prepared.kwargs)
        )

    async def close(self) -> None:
        """Stop the thread pool (running threads finish on their own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
