"""Revocation entries: "do not run this task" (and "stop it if it runs"), kept in a
:class:`~stem.ports.RevokeStore` that every worker reads.

An entry is the Dart Stem's ``RevokeEntry`` JSON (``namespace``, ``taskId``,
``version``, ``issuedAt``, ``terminate``, ``reason``, ``requestedBy``, ``expiresAt``),
so either side reads the other's. ``version`` orders the writes of one task id:
microseconds since the epoch when issued (:func:`new_version`); a store keeps the
entry with the higher version. An entry whose ``expiresAt`` has passed no longer
applies and is pruned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from stem._time import from_iso, to_iso, utcnow
from stem.errors import ConfigurationError

__all__ = ["QUEUE_PAUSE_PREFIX", "RevokeEntry", "new_version"]

#: Task ids of the entries that persist a paused queue (the Dart Stem's layout):
#: ``__stem.queue.pause__:<queue>``; a resume writes the same id, expired now.
QUEUE_PAUSE_PREFIX = "__stem.queue.pause__:"

_last_version = 0


def new_version() -> int:
    """A version for a new entry: microseconds since the epoch, increasing in this process."""
    global _last_version
    v = max(time.time_ns() // 1000, _last_version + 1)
    _last_version = v
    return v


@dataclass(frozen=True, slots=True)
class RevokeEntry:
    """One revocation (see the module docstring). Times are aware UTC datetimes."""

    task_id: str
    version: int
    issued_at: datetime
    terminate: bool = False
    reason: str | None = None
    requested_by: str | None = None
    expires_at: datetime | None = None
    namespace: str = "stem"

    @classmethod
    def new(cls, task_id: str, *, terminate: bool = False, reason: str | None = None,
            requested_by: str | None = None, expires_in: float | None = None,
            namespace: str = "stem", version: int | None = None) -> RevokeEntry:
        """An entry issued now; ``expires_in`` seconds from now it stops applying."""
        if not isinstance(task_id, str) or not task_id:
            raise ConfigurationError(f"a task id to revoke must be a non-empty string, "
                                     f"got {task_id!r}")
        if expires_in is not None and not (0 <= expires_in < float("inf")):
            raise ConfigurationError(f"expires_in must be seconds >= 0, got {expires_in!r}")
        now = utcnow()
        return cls(task_id=task_id, version=new_version() if version is None else version,
                   issued_at=now, terminate=terminate, reason=reason,
                   requested_by=requested_by, namespace=namespace,
                   expires_at=None if expires_in is None else now + timedelta(
                       seconds=expires_in))

    def is_expired(self, now: datetime | None = None) -> bool:
        """True once ``expires_at`` is not after ``now`` (the Dart rule)."""
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    @property
    def is_queue_pause(self) -> bool:
        """True for the entries that persist a paused queue."""
        return self.task_id.startswith(QUEUE_PAUSE_PREFIX)

    def with_namespace(self, namespace: str) -> RevokeEntry:
        """This entry in ``namespace`` (stores keep entries of their own namespace)."""
        return self if self.namespace == namespace else replace(self, namespace=namespace)

    def to_json(self) -> dict[str, Any]:
        """The Dart Stem's JSON for this entry (optional fields left out when unset)."""
        out: dict[str, Any] = {"namespace": self.namespace, "taskId": self.task_id,
                               "version": self.version, "issuedAt": to_iso(self.issued_at),
                               "terminate": self.terminate}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.requested_by is not None:
            out["requestedBy"] = self.requested_by
        if self.expires_at is not None:
            out["expiresAt"] = to_iso(self.expires_at)
        return out

    @classmethod
    def from_json(cls, data: Any) -> RevokeEntry:
        """Read an entry written by :meth:`to_json` (or the Dart Stem); ValueError if bad."""
        if not isinstance(data, dict):
            raise ValueError(f"a revoke entry is a JSON object, got {type(data).__name__}")
        task_id, version = data.get("taskId"), data.get("version")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("a revoke entry needs a taskId")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"revoke entry {task_id!r}: version must be an integer")
        issued, expires = data.get("issuedAt"), data.get("expiresAt")
        reason, by = data.get("reason"), data.get("requestedBy")
        return cls(
            task_id=task_id, version=version,
            issued_at=from_iso(issued) if isinstance(issued, str) else utcnow(),
            terminate=data.get("terminate") is True,
            reason=reason if isinstance(reason, str) else None,
            requested_by=by if isinstance(by, str) else None,
            expires_at=from_iso(expires) if isinstance(expires, str) and expires else None,
            namespace=str(data.get("namespace") or "stem"))


def newest(entries: list[RevokeEntry]) -> dict[str, RevokeEntry]:
    """The entry with the highest version per task id."""
    out: dict[str, RevokeEntry] = {}
    for e in entries:
        cur = out.get(e.task_id)
        if cur is None or e.version > cur.version:
            out[e.task_id] = e
    return out


def default_requester() -> str:
    """Who a revocation is requested by when not told: ``user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
