"""One exception hierarchy: every error Stem raises is a :class:`StemError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stem.status import TaskError, TaskState


class StemError(Exception):
    """Base class of every error raised by Stem."""


class ConfigurationError(StemError, ValueError):
    """The configuration is wrong (bad URL, unknown scheme, invalid option)."""


class ServiceUnavailableError(StemError, ConnectionError):
    """A broker or store could not be reached; the message says which and how to fix it."""


class EnvelopeDecodeError(StemError, ValueError):
    """Bytes read from a broker are not a valid Stem envelope."""


class TaskNotFoundError(StemError, LookupError):
    """No status exists for the task id: it was never enqueued, or its status expired.

    Raised by ``wait()`` without a timeout, which would otherwise wait forever.
    """


class UnknownTaskError(StemError, LookupError):
    """No handler is registered under the envelope's task name.

    A worker dead-letters such a delivery; its status's ``error.type`` is this name.
    """


class TaskArgumentError(StemError, TypeError):
    """Arguments do not fit the task's signature (raised at enqueue time)."""


class ArgumentNotSerializableError(TaskArgumentError, EnvelopeDecodeError):
    """An argument's value cannot travel as JSON (a Decimal, a set, a custom object).

    Raised when the envelope is encoded, so checking costs nothing on the common path;
    nothing is published for that call, and its batch-mates still are.
    """


class PayloadEncodingError(StemError, ValueError):
    """A payload encoder could not encode or decode (unknown encoder id, bad key, corrupt data)."""


class WaitTimeoutError(StemError, TimeoutError):
    """``wait()`` gave up before the task reached a terminal state."""


class TaskFailedError(StemError):
    """A task failed (or was cancelled): raised by ``wait(..., raise_on_failure=True)``
    and ``TaskResult.unwrap()``.

    Carries the remote error: ``type`` (the exception's class name in the worker),
    ``message``, ``stack`` (the worker's traceback, or None) and the whole
    :class:`~stem.status.TaskError` as ``error``; ``task_id`` and ``state`` say which
    task and how it ended. ``str()`` is one line: ``task <id> failed: Type: message``.
    """

    def __init__(self, task_id: str, state: TaskState, error: TaskError | None) -> None:
        self.task_id = task_id
        self.state = state
        self.error = error
        self.type = error.type if error is not None else None
        self.message = error.message if error is not None else None
        self.stack = error.stack if error is not None else None
        detail = f": {error}" if error is not None else " (no error recorded)"
        super().__init__(f"task {task_id} {state.value}{detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.task_id, self.state, self.error))


class SyncCallInLoopError(StemError, RuntimeError):
    """A blocking sync call (``app.enqueue_sync``, ``task.delay``, ...) was made from a
    thread running an event loop; the message names the ``await`` to use instead."""


class SoftTimeLimitExceeded(StemError):
    """Raised inside a task when its soft time limit passes, so the handler can clean up."""


class TimeLimitExceeded(StemError, TimeoutError):
    """The task ran past its hard time limit and was stopped."""


class WorkerLostError(StemError):
    """The process running the task died (crash, ``os._exit``, signal) before it finished."""


class PayloadTooLargeError(EnvelopeDecodeError):
    """An envelope is larger than the payload cap (``STEM_MAX_PAYLOAD_BYTES``, default 16 MiB).

    Raised at enqueue, before anything is published; a worker dead-letters such bytes
    unparsed. A subclass of :class:`EnvelopeDecodeError` (the envelope codec's error),
    so one oversized call in a batch fails only its own caller.
    """


class UnsettledDeliveriesError(StemError):
    """A worker stopped with deliveries it could not settle within its shutdown grace.

    Their results or acks could not be written (the store was unreachable), so they are
    left to their leases and come back to a worker when the leases run out. ``count``
    says how many.
    """

    def __init__(self, count: int) -> None:
        super().__init__(
            f"worker stopped with {count} unsettled deliver{'y' if count == 1 else 'ies'} "
            "(result store or broker unreachable until the shutdown grace ran out); "
            "they run again when their leases expire")
        self.count = count


class ScheduleConflictError(StemError):
    """An optimistic schedule write lost: the entry changed since it was read.

    ``expected`` is the version the writer read, ``actual`` the stored one (None when
    the entry is gone). Read the entry again and re-apply the change.
    """

    def __init__(self, entry_id: str, expected: int | None, actual: int | None) -> None:
        self.entry_id = entry_id
        self.expected = expected
        self.actual = actual
        found = "does not exist" if actual is None else f"is at version {actual}"
        super().__init__(f"schedule entry {entry_id!r} changed meanwhile: expected version "
                         f"{expected}, but it {found}; read it again and retry")


class TaskRevokedError(StemError):
    """The running task was revoked with ``terminate=True``: raised at its next
    ``ctx.heartbeat()`` / ``ctx.progress()`` / ``ctx.extend_lease()`` (a thread cannot
    be stopped from outside); the worker stores it ``cancelled`` and acks it."""
