"""The ScheduleStore contract (stem.testing.conformance.ScheduleStoreConformance) on
every adapter in ADAPTERS, through ``store.schedules``; ``schedule_store_factory``
comes from conftest.py."""

from __future__ import annotations

from stem.testing.conformance import ScheduleStoreConformance


class TestSchedules(ScheduleStoreConformance):
    """Every check of the shared suite, once per built-in adapter."""
