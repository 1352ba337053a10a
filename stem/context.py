"""TaskContext: what a running handler knows about its task and can do about it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from stem.envelope import Envelope
from stem.task import META_PARENT_TASK_ID, META_ROOT_TASK_ID

if TYPE_CHECKING:
    from stem.task import TaskCall, TaskDefinition

#: Headers older releases linked child tasks with: still written (for workers of those
#: releases) and read, but the Dart Stem's meta keys ``stem.parentTaskId`` and
#: ``stem.rootTaskId`` (:mod:`stem.task`) come first.
PARENT_ID_HEADER = "stem-parent-id"
ROOT_ID_HEADER = "stem-root-id"


class ContextOps(Protocol):
    """What the runtime (worker, process-pool child, eager runner) does for a context.

    Methods may be called from the handler's thread; implementations hand the work
    to their event loop safely.
    """

    def extend_lease(self, ctx: TaskContext, seconds: float | None) -> None:
        """Push the delivery's lease out (None: by its visibility timeout)."""
        ...

    def progress(self, ctx: TaskContext, percent: float, data: Any) -> None:
        """Record progress in the status and emit it as an event."""
        ...

    async def enqueue_call(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        """Publish a child task."""
        ...

    def enqueue_call_sync(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        """Publish a child task from a sync handler (blocks that thread, not the loop)."""
        ...

    def resolve(self, name: str) -> TaskDefinition[Any, Any]:
        """The definition registered as ``name`` (or a name-only one)."""
        ...


class TaskContext:
    """Metadata and controls for one attempt of one task.

    ``attempt`` is 0-based. ``meta`` is writable and stored with the task's status.
    ``heartbeat()``/``extend_lease()`` keep a long task's lease from expiring;
    ``progress()`` is visible in the status while the task runs.
    """

    __slots__ = ("_ops", "envelope", "meta", "progress_state")

    def __init__(self, envelope: Envelope, ops: ContextOps) -> None:
        self.envelope = envelope
        self.meta: dict[str, Any] = {}
        self.progress_state: dict[str, Any] | None = None
        self._ops = ops

    @property
    def id(self) -> str:
        """The task id."""
        return self.envelope.id

    @property
    def name(self) -> str:
        """The task name."""
        return self.envelope.name

    @property
    def attempt(self) -> int:
        """The 0-based attempt number."""
        return self.envelope.attempt

    @property
    def queue(self) -> str:
        """The queue this delivery came from."""
        return self.envelope.queue

    @property
    def headers(self) -> dict[str, str]:
        """The envelope's headers."""
        return self.envelope.headers

    @property
    def max_retries(self) -> int:
        """Retries allowed after the first attempt."""
        return self.envelope.max_retries

    def heartbeat(self) -> None:
        """Renew the lease by the task's visibility timeout."""
        self._ops.extend_lease(self, None)

    def extend_lease(self, seconds: float) -> None:
        """Make the lease last at least ``seconds`` from now."""
        self._ops.extend_lease(self, seconds)

    def progress(self, percent: float, data: Any = None) -> None:
        """Report progress (0-100) with optional JSON data."""
        self.progress_state = {"percent": float(percent), "data": data}
        self._ops.progress(self, float(percent), data)

    def _child(self, task: str | TaskDefinition[Any, Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> TaskCall[Any]:
        definition = self._ops.resolve(task) if isinstance(task, str) else task
        root = self.root_id
        # The Dart Stem's meta keys, and the headers older releases read (rolling upgrades).
        return definition.call(*args, **kwargs).with_options(
            meta={META_PARENT_TASK_ID: self.id, META_ROOT_TASK_ID: root},
            headers={PARENT_ID_HEADER: self.id, ROOT_ID_HEADER: root})

    @property
    def parent_id(self) -> str | None:
        """The id of the task that enqueued this one from its context, or None."""
        parent = self.envelope.meta.get(META_PARENT_TASK_ID)
        if isinstance(parent, str):
            return parent
        return self.envelope.headers.get(PARENT_ID_HEADER)

    @property
    def root_id(self) -> str:
        """The id of the first task of this one's lineage (this task's own when it has
        no parent): meta ``stem.rootTaskId``, else the older header ``stem-root-id``."""
        root = self.envelope.meta.get(META_ROOT_TASK_ID)
        if isinstance(root, str) and root:
            return root
        return self.envelope.headers.get(ROOT_ID_HEADER) or self.id

    async def enqueue(self, task: str | TaskDefinition[Any, Any], *args: Any, **kwargs: Any) -> str:
        """Enqueue a child task (by name or definition) from an async handler."""
        return await self._ops.enqueue_call(self, self._child(task, args, kwargs))

    def enqueue_sync(self, task: str | TaskDefinition[Any, Any], *args: Any, **kwargs: Any) -> str:
        """Enqueue a child task from a sync (``def``) handler."""
        return self._ops.enqueue_call_sync(self, self._child(task, args, kwargs))


ProgressCallback = Callable[[TaskContext, float, Any], None]
