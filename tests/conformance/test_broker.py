"""The Broker contract (stem.testing.conformance.BrokerConformance) on every adapter in
ADAPTERS; ``broker_factory`` comes from conftest.py."""

from __future__ import annotations

from stem.testing.conformance import BrokerConformance


class TestBroker(BrokerConformance):
    """Every check of the shared suite, once per built-in adapter."""
