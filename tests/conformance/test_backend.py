"""The ResultBackend contract (stem.testing.conformance.BackendConformance) on every
adapter in ADAPTERS; ``backend_factory`` comes from conftest.py."""

from __future__ import annotations

from stem.testing.conformance import BackendConformance


class TestBackend(BackendConformance):
    """Every check of the shared suite, once per built-in adapter."""
