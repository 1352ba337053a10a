"""The RateLimiter contract (stem.testing.conformance.RateLimiterConformance) on every
adapter in ADAPTERS: each store's ``rate_limiter``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stem.ports import RateLimiter, Store
from stem.testing.conformance import RateLimiterConformance


@pytest.fixture
def rate_limiter_factory(store: Store) -> Callable[[], RateLimiter]:
    return lambda: store.rate_limiter  # type: ignore[attr-defined]


class TestRateLimiter(RateLimiterConformance):
    """Every check of the shared suite, once per built-in adapter."""
