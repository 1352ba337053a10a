"""Group records: what a :class:`~stem.ports.GroupStore` keeps for a group, chord or batch.

A group is created with the number of members it expects and free-form ``meta`` (a
chord keeps its callback there, a batch its task ids). Each member's terminal outcome
is recorded once, by its index in the signature list (:class:`GroupMember`): the
first record of an index wins, so a redelivered member never counts twice and the
results read back in signature order. The counters and the chord claim change in
one atomic step in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from stem.encoding import json_default
from stem.status import TaskError, TaskState


@dataclass(slots=True)
class GroupMember:
    """One member's terminal outcome: its index in the group, task id, state, the
    decoded result value (succeeded) or the error (failed, cancelled)."""

    index: int
    task_id: str
    state: TaskState
    result: Any = None
    error: TaskError | None = None

    def to_json(self) -> bytes:
        """The stored form (a JSON object)."""
        return orjson.dumps({
            "index": self.index, "taskId": self.task_id, "state": self.state.value,
            "result": self.result,
            "error": None if self.error is None else self.error.to_dict(),
        }, default=json_default)

    @classmethod
    def from_json(cls, raw: bytes | str) -> GroupMember:
        """Read the stored form back."""
        data = orjson.loads(raw)
        err = data.get("error")
        return cls(index=int(data["index"]), task_id=str(data["taskId"]),
                   state=TaskState(data["state"]), result=data.get("result"),
                   error=TaskError.from_dict(err) if isinstance(err, dict) else None)


@dataclass(frozen=True, slots=True)
class GroupProgress:
    """What :meth:`~stem.ports.GroupStore.add_result` returns: the counters right after
    the call, and whether this call recorded the member (False: it was recorded
    before, e.g. by an earlier delivery of the same task)."""

    expected: int
    completed: int
    failed: int
    added: bool

    @property
    def complete(self) -> bool:
        """Every member has a terminal outcome."""
        return self.completed >= self.expected

    @property
    def all_succeeded(self) -> bool:
        """Complete, and no member failed or was cancelled."""
        return self.complete and self.failed == 0


@dataclass(slots=True)
class GroupRecord:
    """A stored group: expected count, counters, meta, members (by index) and whether
    its callback was claimed."""

    id: str
    expected: int
    meta: dict[str, Any] = field(default_factory=dict)
    members: list[GroupMember] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    claimed: bool = False
    created_at: datetime | None = None
    expires_at: datetime | None = None

    @property
    def complete(self) -> bool:
        """Every member has a terminal outcome."""
        return self.completed >= self.expected

    @property
    def state(self) -> str:
        """``pending`` (nothing done), ``running``, ``succeeded`` (all succeeded) or
        ``failed`` (a member failed or was cancelled; a chord's callback never runs)."""
        if self.failed:
            return "failed"
        if self.complete:
            return "succeeded"
        return "running" if self.completed else "pending"

    def counts(self) -> dict[str, int]:
        """Recorded members per state."""
        out: dict[str, int] = {}
        for m in self.members:
            out[m.state.value] = out.get(m.state.value, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``stem group show --json``)."""
        return {
            "id": self.id, "state": self.state, "expected": self.expected,
            "completed": self.completed, "failed": self.failed, "claimed": self.claimed,
            "createdAt": None if self.created_at is None else self.created_at.isoformat(),
            "expiresAt": None if self.expires_at is None else self.expires_at.isoformat(),
            "meta": self.meta,
            "members": [orjson.loads(m.to_json()) for m in self.members],
        }


def dump_meta(meta: dict[str, Any]) -> bytes:
    """Group meta as stored (JSON bytes)."""
    return orjson.dumps(meta, default=json_default)
