"""The GroupStore contract (stem.testing.conformance.GroupStoreConformance) on every
adapter in ADAPTERS."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stem.ports import GroupStore, Store
from stem.testing.conformance import GroupStoreConformance


@pytest.fixture
def group_store_factory(store: Store) -> Callable[[], GroupStore]:
    """What GroupStoreConformance builds its group store with: the store's own."""
    return lambda: store.groups  # type: ignore[attr-defined,no-any-return]


class TestGroupStore(GroupStoreConformance):
    """Every check of the shared suite, once per built-in adapter."""
