"""In-process group store: records in a dict under one lock, with expiry times."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime
from typing import Any

from stem._time import now_epoch
from stem.groups import GroupMember, GroupProgress, GroupRecord


class MemoryGroupStore:
    """A :class:`stem.ports.GroupStore` for one process (thread-safe; shared by name
    like the memory broker and backend)."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._groups: dict[str, tuple[GroupRecord, dict[int, GroupMember], float]] = {}

    def __repr__(self) -> str:
        return f"MemoryGroupStore({self.name!r})"

    def _live(self, group_id: str) -> tuple[GroupRecord, dict[int, GroupMember], float] | None:
        entry = self._groups.get(group_id)
        if entry is not None and entry[2] <= now_epoch():
            del self._groups[group_id]
            return None
        return entry

    async def create(self, group_id: str, expected: int, meta: dict[str, Any],
                     ttl: float) -> bool:
        """Create the record unless one exists."""
        now = now_epoch()
        with self._lock:
            if self._live(group_id) is not None:
                return False
            record = GroupRecord(group_id, expected, copy.deepcopy(meta),
                                 created_at=datetime.fromtimestamp(now, UTC),
                                 expires_at=datetime.fromtimestamp(now + ttl, UTC))
            self._groups[group_id] = (record, {}, now + ttl)
            return True

    async def add_result(self, group_id: str, member: GroupMember) -> GroupProgress | None:
        """Record the member once (the first record of an index wins)."""
        with self._lock:
            entry = self._live(group_id)
            if entry is None:
                return None
            record, members, _ = entry
            added = member.index not in members
            if added:
                members[member.index] = GroupMember.from_json(member.to_json())
                record.completed += 1
                if member.state.value != "succeeded":
                    record.failed += 1
            return GroupProgress(record.expected, record.completed, record.failed, added)

    async def claim_callback(self, group_id: str) -> bool:
        """True once, when every member succeeded."""
        with self._lock:
            entry = self._live(group_id)
            if entry is None:
                return False
            record = entry[0]
            if record.claimed or not record.complete or record.failed:
                return False
            record.claimed = True
            return True

    async def get(self, group_id: str) -> GroupRecord | None:
        """A copy of the record, members in index order."""
        with self._lock:
            entry = self._live(group_id)
            if entry is None:
                return None
            record, members, _ = entry
            out = copy.deepcopy(record)
            out.members = [copy.deepcopy(members[i]) for i in sorted(members)]
            return out

    async def close(self) -> None:
        """Nothing to release."""
