"""Periodic tasks: schedule entries, the stores that keep them, and the beat that
dispatches them (``stem beat``; see docs/beat.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun

if TYPE_CHECKING:
    from stem.beat.beat import Beat
    from stem.beat.file_store import FileScheduleStore

__all__ = ["Beat", "FileScheduleStore", "MarkRun", "ScheduleEntry", "ScheduleRun"]


def __getattr__(name: str) -> Any:
    # Lazy: stem.ports imports this package for the entry types, and the beat imports
    # stem.ports (an eager import here would be a cycle).
    if name == "Beat":
        from stem.beat.beat import Beat
        return Beat
    if name == "FileScheduleStore":
        from stem.beat.file_store import FileScheduleStore
        return FileScheduleStore
    raise AttributeError(f"module 'stem.beat' has no attribute {name!r}")
