"""The task-context operations of a running worker (``ctx.progress``, ``ctx.extend_lease``...).

:class:`~stem.context.TaskContext` delegates to an ops object; in a worker that is a
:class:`WorkerContextOps` per attempt, built on one :class:`ContextRuntime` per
worker run: the few things the operations need from the worker, passed explicitly.
Handlers may call the operations from the worker's loop or from a thread (``def``
handlers); work for the loop is handed over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stem import signals
from stem.context import TaskContext
from stem.errors import TaskRevokedError
from stem.limits import check_visibility_timeout
from stem.ports import Delivery
from stem.status import TaskState, TaskStatus
from stem.worker.revoke import revoked_message

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.revoke import RevokeEntry
    from stem.task import TaskCall, TaskDefinition


@dataclass(frozen=True, slots=True)
class ContextRuntime:
    """What task contexts need from the worker they run in (one per worker run).

    ``loop`` is the worker's event loop; ``record_status(status, ttl)`` queues a status
    write (the completer's ``status``); ``lease_length(delivery)`` is the length of the
    delivery's current lease; ``extend_lease(delivery, seconds)`` extends it now;
    ``spawn(coro)`` runs a coroutine on the loop as work the worker waits for when it
    drains; ``sender`` is what ``task_progress`` signals are sent by (the worker).
    """

    app: Stem
    loop: asyncio.AbstractEventLoop
    record_status: Callable[[TaskStatus, float | None], None]
    lease_length: Callable[[Delivery], float]
    extend_lease: Callable[[Delivery, float], Coroutine[Any, Any, None]]
    spawn: Callable[[Coroutine[Any, Any, Any]], None]
    sender: Any
    #: The terminate revoke that reached a running task (by id), if any: its next
    #: heartbeat / progress / lease extension raises TaskRevokedError.
    revoked: Callable[[str], RevokeEntry | None] | None = None


class WorkerContextOps:
    """TaskContext operations for one attempt running in a worker (any thread)."""

    __slots__ = ("base_meta", "delivery", "runtime")

    def __init__(self, runtime: ContextRuntime, delivery: Delivery,
                 base_meta: dict[str, Any]) -> None:
        self.runtime = runtime
        self.delivery = delivery
        self.base_meta = base_meta

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self.runtime.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _check_revoked(self, ctx: TaskContext) -> None:
        revoked = self.runtime.revoked
        entry = None if revoked is None else revoked(ctx.envelope.id)
        if entry is not None:
            raise TaskRevokedError(revoked_message(entry))

    def extend_lease(self, ctx: TaskContext, seconds: float | None) -> None:
        self._check_revoked(ctx)
        rt, d = self.runtime, self.delivery
        secs = check_visibility_timeout(seconds) if seconds is not None else rt.lease_length(d)
        self._on_loop(lambda: rt.spawn(rt.extend_lease(d, secs)))

    def progress(self, ctx: TaskContext, percent: float, data: Any) -> None:
        self._check_revoked(ctx)
        env = ctx.envelope
        meta = {**self.base_meta, **ctx.meta, "progress": {"percent": percent, "data": data}}
        status = TaskStatus(env.id, TaskState.RUNNING, attempt=env.attempt, meta=meta)
        rt = self.runtime

        def record() -> None:
            rt.record_status(status, None)
            if signals.task_progress.has_receivers:
                signals.task_progress.send(rt.sender, envelope=env, percent=percent, data=data)

        self._on_loop(record)

    def resolve(self, name: str) -> TaskDefinition[Any, Any]:
        return self.runtime.app.definition(name)

    async def enqueue_call(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        return await self.runtime.app.enqueue_call(call)

    def enqueue_call_sync(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        fut = asyncio.run_coroutine_threadsafe(self.runtime.app.enqueue_call(call),
                                               self.runtime.loop)
        return fut.result()
