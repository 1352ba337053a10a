"""Task states, stored statuses, errors and typed results."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

import orjson

R = TypeVar("R")

_STATUS_KEYS = frozenset({"id", "state", "payload", "error", "meta", "attempt"})
_ERROR_KEYS = frozenset({"type", "message", "stack", "retryable"})


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
    """Why an attempt failed: exception type, message, traceback, retryability."""

    type: str
    message: str
    stack: str | None = None
    retryable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException, *, retryable: bool = False) -> TaskError:
        """Capture ``exc`` with its traceback."""
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type=type(exc).__name__, message=str(exc), stack=stack, retryable=retryable)

    def to_dict(self) -> dict[str, Any]:
        """Wire-format JSON object."""
        out = dict(self.extra) if self.extra else {}
        out.update(
            type=self.type, message=self.message, stack=self.stack, retryable=self.retryable
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskError:
        """Parse the wire-format JSON object."""
        return cls(
            type=str(data.get("type") or "Error"),
            message=str(data.get("message") or ""),
            stack=data.get("stack"),
            retryable=bool(data.get("retryable", False)),
            extra={k: v for k, v in data.items() if k not in _ERROR_KEYS},
        )


@dataclass(slots=True)
class TaskStatus:
    """What the result backend stores for one task id.

    ``payload`` is the *encoded* result (see ``meta['__stemResultEncoder']``);
    ``meta`` also carries progress (``meta['progress']``) and handler-written metadata.
    """

    id: str
    state: TaskState
    payload: Any = None
    error: TaskError | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Wire-format JSON object."""
        out = dict(self.extra) if self.extra else {}
        out["id"] = self.id
        out["state"] = self.state.value
        out["payload"] = self.payload
        out["error"] = None if self.error is None else self.error.to_dict()
        out["meta"] = self.meta
        out["attempt"] = self.attempt
        return out

    def to_json(self) -> bytes:
        """Encode to bytes."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskStatus:
        """Parse the wire-format JSON object."""
        err = data.get("error")
        return cls(
            id=str(data["id"]),
            state=TaskState(data["state"]),
            payload=data.get("payload"),
            error=TaskError.from_dict(err) if isinstance(err, dict) else None,
            meta=dict(data.get("meta") or {}),
            attempt=int(data.get("attempt") or 0),
            extra={k: v for k, v in data.items() if k not in _STATUS_KEYS},
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> TaskStatus:
        """Decode bytes written by :meth:`to_json`."""
        return cls.from_dict(orjson.loads(raw))


@dataclass(slots=True)
class TaskResult(Generic[R]):
    """A task's outcome as seen by a caller: decoded value, error, attempt, metadata."""

    id: str
    state: TaskState
    value: R | None = None
    error: TaskError | None = None
    attempt: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

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
