"""The LockStore contract (stem.testing.conformance.LockConformance) on every adapter
in ADAPTERS, through ``store.locks``; ``lock_store_factory`` comes from conftest.py."""

from __future__ import annotations

from stem.testing.conformance import LockConformance


class TestLocks(LockConformance):
    """Every check of the shared suite, once per built-in adapter."""
