"""The conformance suite: the checks every broker and result backend passes.

Stem runs it on its four adapters (``tests/conformance/``); an adapter of your own runs
the same checks by subclassing the test classes and providing a factory fixture::

    from stem.testing.conformance import BackendConformance, BrokerConformance

    class TestMyBroker(BrokerConformance):
        @pytest.fixture
        def broker_factory(self):
            return lambda: MyBroker(...)   # fresh, empty storage for each test

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_factory(self):
            return lambda: MyResultBackend(...)

The lock and schedule stores the beat uses have theirs too: ``LockConformance``
(``lock_store_factory``) and ``ScheduleStoreConformance`` (``schedule_store_factory``).

See docs/conformance.md. Test dependencies: pytest and pytest-asyncio.
"""

from __future__ import annotations

try:
    import pytest  # noqa: F401
    import pytest_asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stem.testing.conformance runs under pytest: install the test dependencies "
        "with `pip install pytest pytest-asyncio`"
    ) from exc

from stem.testing.conformance.backend import BackendConformance, BackendFactory
from stem.testing.conformance.broker import BrokerConformance, BrokerFactory
from stem.testing.conformance.groups import GroupStoreConformance, GroupStoreFactory
from stem.testing.conformance.locks import LockConformance, LockStoreFactory
from stem.testing.conformance.schedules import ScheduleStoreConformance, ScheduleStoreFactory

__all__ = [
    "BackendConformance",
    "BackendFactory",
    "BrokerConformance",
    "BrokerFactory",
    "GroupStoreConformance",
    "GroupStoreFactory",
    "LockConformance",
    "LockStoreFactory",
    "ScheduleStoreConformance",
    "ScheduleStoreFactory",
]
from stem.testing.conformance.ratelimit import RateLimiterConformance, RateLimiterFactory

__all__ = ["BackendConformance", "BackendFactory", "BrokerConformance", "BrokerFactory",
           "RateLimiterConformance", "RateLimiterFactory"]
