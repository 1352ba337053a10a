"""The ControlChannel and HeartbeatStore contracts on every adapter in ADAPTERS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from stem.ports import Store
from stem.testing.conformance.control import (
    ControlChannelConformance,
    HeartbeatStoreConformance,
)


class TestControlChannel(ControlChannelConformance):
    @pytest.fixture
    def control_factory(self, store: Store) -> Callable[[], Any]:
        return lambda: store.control  # type: ignore[attr-defined]


class TestHeartbeats(HeartbeatStoreConformance):
    @pytest.fixture
    def heartbeat_factory(self, store: Store) -> Callable[[], Any]:
        return lambda: store.heartbeats  # type: ignore[attr-defined]
