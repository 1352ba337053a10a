"""Task states, stored statuses, errors and typed results.

The JSON forms match the Dart Stem's ``TaskStatus.toJson`` / ``TaskError.toJson``;
``createdAt``/``updatedAt`` are the timestamps its Redis backend stores next to a
status. Keys this version does not know are kept in ``extra`` and written back.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

import orjson

from stem._time import from_iso, to_iso
from stem.errors import StemError, TaskFailedError

R = TypeVar("R")

_STATUS_KEYS = frozenset(
    {"id", "state", "payload", "error", "meta", "attempt", "createdAt", "updatedAt"}
)
_ERROR_KEYS = frozenset({"type", "message", "stack", "retryable", "meta"})


class TaskState(StrEnum):
    """Lifecycle state of a task as stored in the result backend."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for states a task never leaves (succeeded, failed, cancelled)."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(slots=True)
class TaskError:
    """Why an attempt failed: exception type, message, traceback, retryability.

    ``meta`` is free-form detail (the Dart worker puts e.g. ``reason``/``keyId`` there).
    """

    type: str
    message: str
    stack: str | None = None
    retryable: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        """One readable line, ``Type: message`` (the stack stays in :attr:`stack`)."""
        message = " ".join(line.strip() for line in self.message.splitlines() if line.strip())
        return f"{self.type}: {message}" if message else self.type

    @classmethod
    def from_exception(cls, exc: BaseException, *, retryable: bool = False) -> TaskError:
        """Capture ``exc`` with its traceback."""
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type=type(exc).__name__, message=str(exc), stack=stack, retryable=retryable)

    def to_dict(self) -> dict[str, Any]:
        """Wire-format JSON object."""
        out = dict(self.extra) if self.extra else {}
        out.update(
            type=self.type,
            message=self.message,
            stack=self.stack,
            retryable=self.retryable,
            meta=self.meta,
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskError:
        """Parse the wire-format JSON object (defaults as in the Dart Stem)."""
        meta = data.get("meta")
        return cls(
            type=str(data.get("type") or "Unknown"),
            message=str(data.get("message") or ""),
            stack=data.get("stack"),
            retryable=bool(data.get("retryable", False)),
            meta=dict(meta) if isinstance(meta, dict) else {},
            extra={k: v for k, v in data.items() if k not in _ERROR_KEYS},
        )


@dataclass(slots=True)
class TaskStatus:
    """What the result backend stores for one task id.

    ``payload`` is the *encoded* result (see ``meta['__stemResultEncoder']``);
    ``meta`` also carries progress (``meta['progress']``) and handler-written metadata.
    ``created_at``/``updated_at`` are set by backends that record them (the Dart
    Redis backend does) and are written only when set.
    """

    id: str
    state: TaskState
    payload: Any = None
    error: TaskError | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Read-only views of what the Dart worker records in ``meta`` (same key fallbacks).

    @property
    def task_name(self) -> str | None:
        """Task name from ``meta['task']`` / ``meta['stem.task']``."""
        return _meta_str(self.meta, "task", "stem.task")

    @property
    def queue_name(self) -> str | None:
        """Queue from ``meta['queue']`` / ``meta['stem.queue']``."""
        return _meta_str(self.meta, "queue", "stem.queue")

    @property
    def worker_id(self) -> str | None:
        """Worker that reported this status, from ``meta['worker']``."""
        return _meta_str(self.meta, "worker")

    @property
    def started_at(self) -> datetime | None:
        """When the attempt started, from ``meta['startedAt']``."""
        return _meta_time(self.meta, "startedAt")

    @property
    def completed_at(self) -> datetime | None:
        """When the task succeeded, from ``meta['completedAt']``."""
        return _meta_time(self.meta, "completedAt")

    @property
    def failed_at(self) -> datetime | None:
        """When the task failed, from ``meta['failedAt']``."""
        return _meta_time(self.meta, "failedAt")

    def to_dict(self) -> dict[str, Any]:
        """Wire-format JSON object."""
        out = dict(self.extra) if self.extra else {}
        out["id"] = self.id
        out["state"] = self.state.value
        out["payload"] = self.payload
        out["error"] = None if self.error is None else self.error.to_dict()
        out["meta"] = self.meta
        out["attempt"] = self.attempt
        if self.created_at is not None:
            out["createdAt"] = to_iso(self.created_at)
        if self.updated_at is not None:
            out["updatedAt"] = to_iso(self.updated_at)
        return out

    def to_json(self) -> bytes:
        """Encode to bytes."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskStatus:
        """Parse the wire-format JSON object.

        An unknown ``state`` reads as ``queued``, as in the Dart Stem, so a status
        from a newer writer never makes a reader fail.
        """
        err = data.get("error")
        extra = {k: v for k, v in data.items() if k not in _STATUS_KEYS}
        try:
            state = TaskState(data["state"])
        except ValueError:
            state = TaskState.QUEUED
        return cls(
            id=str(data["id"]),
            state=state,
            payload=data.get("payload"),
            error=TaskError.from_dict(err) if isinstance(err, dict) else None,
            meta=dict(data.get("meta") or {}),
            attempt=int(data.get("attempt") or 0),
            created_at=_wire_time(data, "createdAt", extra),
            updated_at=_wire_time(data, "updatedAt", extra),
            extra=extra,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> TaskStatus:
        """Decode bytes written by :meth:`to_json`."""
        return cls.from_dict(orjson.loads(raw))


def _wire_time(data: dict[str, Any], key: str, extra: dict[str, Any]) -> datetime | None:
    value = data.get(key)
    if isinstance(value, str):
        try:
            return from_iso(value)
        except ValueError:
            pass
    if value is not None:
        extra[key] = value  # not a time we can read: keep it verbatim rather than drop it
    return None


def _meta_str(meta: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = meta.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def _meta_time(meta: dict[str, Any], key: str) -> datetime | None:
    value = meta.get(key)
    if not isinstance(value, str):
        return None
    try:
        return from_iso(value)
    except ValueError:
        return None


@dataclass(slots=True)
class TaskResult(Generic[R]):
    """A task's outcome as seen by a caller: decoded value, error, attempt, metadata.

    ``raw_payload`` is the payload as stored, before the result encoder and any
    ``decode`` callback ran.
    """

    id: str
    state: TaskState
    value: R | None = None
    error: TaskError | None = None
    attempt: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    raw_payload: Any = None

    @property
    def succeeded(self) -> bool:
        """True when the task finished successfully."""
        return self.state is TaskState.SUCCEEDED

    @property
    def failed(self) -> bool:
        """True when the task failed for good."""
        return self.state is TaskState.FAILED

    @property
    def ready(self) -> bool:
        """True when the state is terminal."""
        return self.state.is_terminal

    @property
    def progress(self) -> dict[str, Any] | None:
        """Last progress report (``{'percent': float, 'data': ...}``), if any."""
        p = self.meta.get("progress")
        return p if isinstance(p, dict) else None

    def unwrap(self) -> R:
        """The value of a succeeded task; raises otherwise.

        A failed or cancelled task raises :class:`~stem.errors.TaskFailedError` with
        the remote error's type, message and stack; a task that has not finished yet
        (queued, running, retried) raises :class:`~stem.errors.StemError`.
        """
        if self.state is TaskState.SUCCEEDED:
            return self.value  # type: ignore[return-value]  # None is a valid R here
        if self.state.is_terminal:
            raise TaskFailedError(self.id, self.state, self.error)
        raise StemError(f"task {self.id} has not finished (state {self.state.value}); "
                        "wait for it first")
