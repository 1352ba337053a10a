"""Periodic tasks: schedule entries, the stores that keep them, and the beat that
dispatches them (``stem beat``)."""

from stem.beat.entry import ScheduleEntry, ScheduleRun

__all__ = ["ScheduleEntry", "ScheduleRun"]
