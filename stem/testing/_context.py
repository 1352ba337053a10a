"""A TaskContext for unit tests: no worker, every call recorded for assertions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stem.context import TaskContext
from stem.envelope import DEFAULT_QUEUE, Envelope, new_task_id
from stem.limits import check_visibility_timeout

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.task import TaskCall, TaskDefinition


@dataclass
class ContextRecorder:
    """What a handler did with its :class:`RecordingContext`, in call order.

    ``progress``: ``(percent, data)`` per ``ctx.progress(...)``. ``leases``: one entry
    per ``ctx.heartbeat()`` (None: by the task's visibility timeout) or
    ``ctx.extend_lease(seconds)``. ``enqueued``: each child task as its
    :class:`~stem.task.TaskCall` (name, bound ``args``, and the parent/root headers a
    worker adds), with the id the enqueue returned in ``ids``.
    """

    progress: list[tuple[float, Any]] = field(default_factory=list)
    leases: list[float | None] = field(default_factory=list)
    enqueued: list[TaskCall[Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    @property
    def heartbeats(self) -> int:
        """How many times ``ctx.heartbeat()`` was called."""
        return sum(1 for x in self.leases if x is None)


class _RecordingOps:
    """The context operations of :func:`make_context`: record, and publish children only
    through an eager app (a unit test must not reach a real broker by accident)."""

    def __init__(self, recorder: ContextRecorder, app: Stem | None) -> None:
        self.recorder = recorder
        self.app = app

    def extend_lease(self, ctx: TaskContext, seconds: float | None) -> None:
        # The worker refuses the same lengths, so a test catches a bad one too.
        self.recorder.leases.append(None if seconds is None else check_visibility_timeout(seconds))

    def progress(self, ctx: TaskContext, percent: float, data: Any) -> None:
        self.recorder.progress.append((percent, data))

    def resolve(self, name: str) -> TaskDefinition[Any, Any]:
        if self.app is not None:
            return self.app.definition(name)
        from stem.task import TaskDefinition

        return TaskDefinition(name)

    def _record(self, call: TaskCall[Any]) -> str:
        task_id = call.task_id or new_task_id()
        self.recorder.enqueued.append(call)
        self.recorder.ids.append(task_id)
        return task_id

    async def enqueue_call(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        if self.app is not None and self.app.eager:
            call = call.with_options(task_id=call.task_id or new_task_id())
            self._record(call)
            return await self.app.enqueue_call(call)
        return self._record(call)

    def enqueue_call_sync(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        if self.app is not None and self.app.eager:
            call = call.with_options(task_id=call.task_id or new_task_id())
            self._record(call)
            return self.app.enqueue_call_sync(call)
        return self._record(call)


class RecordingContext(TaskContext):
    """A :class:`~stem.context.TaskContext` that needs no worker (build it with
    :func:`make_context`); ``ctx.calls`` is its :class:`ContextRecorder`."""

    __slots__ = ("calls",)

    def __init__(self, envelope: Envelope, recorder: ContextRecorder, app: Stem | None) -> None:
        super().__init__(envelope, _RecordingOps(recorder, app))
        self.calls = recorder


def make_context(
    *,
    task_id: str | None = None,
    name: str = "test.task",
    attempt: int = 0,
    max_retries: int = 0,
    queue: str = DEFAULT_QUEUE,
    headers: dict[str, str] | None = None,
    meta: dict[str, Any] | None = None,
    app: Stem | None = None,
) -> RecordingContext:
    """A TaskContext for calling a handler in a unit test: ``handler(ctx, ...)``.

    ``attempt`` is 0-based (``ctx.attempt``); ``meta`` is the envelope's meta (what the
    producer passed as ``enqueue(meta=...)``, ``ctx.envelope.meta``), while ``ctx.meta``
    starts empty as in a worker. ``progress()``, ``heartbeat()``, ``extend_lease()`` and
    child enqueues are recorded in ``ctx.calls`` (:class:`ContextRecorder`). Child tasks
    named by a string are looked up in ``app`` when given; they run only when ``app`` is
    eager (:func:`stem.testing.eager`), else they just get a fresh id.
    """
    envelope = Envelope(name=name, args={}, queue=queue, attempt=attempt,
                        max_retries=max_retries, headers=dict(headers or {}),
                        meta=dict(meta or {}))
    if task_id is not None:
        envelope.id = task_id
    return RecordingContext(envelope, ContextRecorder(), app)
