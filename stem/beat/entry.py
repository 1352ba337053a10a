"""Schedule entries and run records: what a schedule store keeps, in the Dart Stem's JSON.

A :class:`ScheduleEntry` is one periodic task: which task with which arguments, when
(``spec``, the Dart spec JSON, e.g. ``{"kind": "interval", "everyMs": 30000}`` or
``{"kind": "cron", "expression": "*/5 * * * *"}``), and its run bookkeeping. The beat
computes ``next_run_at``; stores only keep it (and index it for :meth:`due`), so every
store applies the same next-run rules.

``to_dict``/``from_dict`` use the Dart ``ScheduleEntry`` JSON keys (``taskName``,
``jitterMs``, ``lastRunAt``, ...), so schedule files and stores written by either side
read on the other. Keys this version does not know are kept in ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from stem._time import from_iso, to_iso

__all__ = ["MarkRun", "ScheduleEntry", "ScheduleRun"]

# Dart JSON key -> attribute, for the datetime fields.
_TIMES = {
    "lastRunAt": "last_run_at",
    "nextRunAt": "next_run_at",
    "lastSuccessAt": "last_success_at",
    "lastErrorAt": "last_error_at",
    "expireAt": "expire_at",
    "createdAt": "created_at",
    "updatedAt": "updated_at",
}
# Dart JSON key -> attribute, for the plain fields.
_PLAIN = {
    "id": "id",
    "taskName": "task",
    "queue": "queue",
    "spec": "spec",
    "args": "args",
    "kwargs": "kwargs",
    "enabled": "enabled",
    "jitterMs": "jitter_ms",
    "lastJitterMs": "last_jitter_ms",
    "lastError": "last_error",
    "timezone": "timezone",
    "totalRunCount": "total_run_count",
    "driftMs": "drift_ms",
    "version": "version",
    "meta": "meta",
}
_KNOWN = frozenset(_TIMES) | frozenset(_PLAIN)


@dataclass(slots=True)
class ScheduleEntry:
    """One periodic task and its run bookkeeping (the Dart ``ScheduleEntry``).

    ``spec`` is the schedule in Dart's spec JSON (``kind`` = interval, cron, clocked,
    solar or calendar). ``args`` are the task's arguments by name (as an envelope
    carries them); ``kwargs`` go to the envelope's meta as Dart does. ``version`` is
    bumped by every write and checked by optimistic updates.
    """

    id: str
    task: str
    spec: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    enabled: bool = True
    jitter_ms: int = 0
    timezone: str | None = None
    expire_at: datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None
    last_jitter_ms: int | None = None
    last_error: str | None = None
    last_success_at: datetime | None = None
    last_error_at: datetime | None = None
    total_run_count: int = 0
    drift_ms: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def copy(self, **changes: Any) -> ScheduleEntry:
        """A copy with ``changes`` applied (containers copied, so edits don't leak)."""
        base = replace(self, spec=dict(self.spec), args=dict(self.args),
                       kwargs=dict(self.kwargs), meta=dict(self.meta), extra=dict(self.extra))
        return replace(base, **changes) if changes else base

    def to_dict(self) -> dict[str, Any]:
        """Dart ``ScheduleEntry`` JSON (``kwargs`` only when non-empty, as Dart writes)."""
        out: dict[str, Any] = dict(self.extra)
        for key, attr in _PLAIN.items():
            value = getattr(self, attr)
            if key == "kwargs" and not value:
                continue
            out[key] = value
        for key, attr in _TIMES.items():
            value = getattr(self, attr)
            out[key] = None if value is None else to_iso(value)
        return out

    def to_json(self) -> bytes:
        """:meth:`to_dict` as JSON bytes."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleEntry:
        """Read Dart ``ScheduleEntry`` JSON; raise ValueError naming a bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a schedule entry must be a JSON object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for key, attr in _PLAIN.items():
            if key in data and data[key] is not None:
                kwargs[attr] = data[key]
        for key, attr in _TIMES.items():
            value = data.get(key)
            if value is not None:
                try:
                    kwargs[attr] = from_iso(value) if isinstance(value, str) else value
                except ValueError:
                    raise ValueError(f"schedule entry field {key!r}: not an ISO-8601 time: "
                                     f"{value!r}") from None
        for required in ("id", "task", "spec"):
            if required not in kwargs:
                key = {"task": "taskName"}.get(required, required)
                raise ValueError(f"schedule entry lacks {key!r}")
        kwargs["extra"] = {k: v for k, v in data.items() if k not in _KNOWN}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ScheduleEntry:
        """:meth:`from_dict` from JSON text."""
        return cls.from_dict(orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class ScheduleRun:
    """One dispatch of an entry, kept in its bounded run history (Dart's history stream
    fields ``scheduledAt``, ``executedAt``, ``success``, ``durationMs``, ``error``)."""

    entry_id: str
    scheduled_at: datetime
    executed_at: datetime
    success: bool
    duration_ms: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Dart JSON."""
        return {"scheduledAt": to_iso(self.scheduled_at), "executedAt": to_iso(self.executed_at),
                "success": self.success, "durationMs": self.duration_ms, "error": self.error}


@dataclass(frozen=True, slots=True)
class MarkRun:
    """One run to record with :meth:`stem.ports.ScheduleStore.mark_runs`: the arguments
    of :meth:`~stem.ports.ScheduleStore.mark_run`, as a value."""

    run: ScheduleRun
    expected_version: int
    next_run_at: datetime | None
    jitter_ms: int = 0
    disable: bool = False

    @property
    def entry_id(self) -> str:
        """The entry the run belongs to."""
        return self.run.entry_id
