"""The RateLimiter contract (:class:`stem.ports.RateLimiter`) as a test class any
adapter can run: subclass :class:`RateLimiterConformance` and give it a
``rate_limiter_factory`` fixture that builds a limiter on storage no other test uses
(see docs/conformance.md)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from stem.ports import RateLimiter

__all__ = ["RateLimiterConformance", "RateLimiterFactory"]

#: Builds the rate limiter under test (or an awaitable of it), on fresh storage.
RateLimiterFactory = Callable[[], RateLimiter | Awaitable[RateLimiter]]


class RateLimiterConformance:
    """The checks every :class:`stem.ports.RateLimiter` passes (Stem's four adapters do).

    Periods are long (60 s) where a check must not see tokens come back while it runs,
    so the checks hold on a slow machine too.
    """

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def limiter(self, rate_limiter_factory: RateLimiterFactory
                      ) -> AsyncIterator[RateLimiter]:
        """The rate limiter under test, closed after the test."""
        made = rate_limiter_factory()
        lim = await made if inspect.isawaitable(made) else made
        try:
            yield lim
        finally:
            await lim.close()

    async def test_limit_then_denied_with_retry_after(self, limiter: RateLimiter) -> None:
        # 5 per minute: five pass at once, the sixth waits about one emission interval.
        for i in range(5):
            assert (await limiter.acquire("k", 5, 60.0)).allowed, i
        denied = await limiter.acquire("k", 5, 60.0)
        assert not denied.allowed and not denied.reserved
        assert 10.0 < denied.retry_after <= 12.0, denied
        again = await limiter.acquire("k", 5, 60.0)  # a denial counts nothing
        assert not again.allowed and abs(again.retry_after - denied.retry_after) < 1.0

    async def test_keys_are_independent(self, limiter: RateLimiter) -> None:
        assert (await limiter.acquire("a", 1, 60.0)).allowed
        assert not (await limiter.acquire("a", 1, 60.0)).allowed
        assert (await limiter.acquire("b", 1, 60.0)).allowed
        assert (await limiter.acquire("a:b", 1, 60.0)).allowed

    async def test_tokens_come_back_at_the_rate(self, limiter: RateLimiter) -> None:
        # 20 per 10 s: after the burst, one more every 0.5 s.
        for _ in range(20):
            assert (await limiter.acquire("steady", 20, 10.0)).allowed
        denied = await limiter.acquire("steady", 20, 10.0)
        assert not denied.allowed and 0 < denied.retry_after <= 0.5, denied
        await asyncio.sleep(denied.retry_after + 0.05)
        assert (await limiter.acquire("steady", 20, 10.0)).allowed
        assert not (await limiter.acquire("steady", 20, 10.0)).allowed

    async def test_concurrent_acquirers_never_exceed_the_limit(
            self, limiter: RateLimiter) -> None:
        decisions = await asyncio.gather(
            *(limiter.acquire("shared", 10, 60.0) for _ in range(50)))
        assert sum(d.allowed for d in decisions) == 10
        assert all(d.retry_after > 0 for d in decisions if not d.allowed)

    async def test_reservations_hand_out_consecutive_slots(self, limiter: RateLimiter) -> None:
        # 10 per minute: one slot every 6 s. With max_wait 20 s, the three slots after
        # the burst are reserved (6, 12, 18 s ahead); the next is denied, told to ask
        # again when a slot lies within max_wait.
        for _ in range(10):
            assert (await limiter.acquire("r", 10, 60.0, max_wait=20.0)).allowed
        started = time.monotonic()
        slots = [await limiter.acquire("r", 10, 60.0, max_wait=20.0) for _ in range(3)]
        elapsed = time.monotonic() - started
        assert all(s.reserved and not s.allowed for s in slots), slots
        for n, s in enumerate(slots, 1):
            assert 6.0 * n - 1.0 - elapsed < s.retry_after <= 6.0 * n + 0.01, slots
        over = await limiter.acquire("r", 10, 60.0, max_wait=20.0)
        assert not over.allowed and not over.reserved
        assert 3.0 < over.retry_after <= 4.01, over

    async def test_concurrent_reservations_are_distinct(self, limiter: RateLimiter) -> None:
        decisions = await asyncio.gather(
            *(limiter.acquire("c", 10, 10.0, max_wait=10.0) for _ in range(30)))
        assert sum(d.allowed for d in decisions) == 10
        reserved = sorted(d.retry_after for d in decisions if d.reserved)
        assert len(reserved) == 10, decisions
        # One per emission interval (1 s), give or take the time the calls took.
        gaps = [b - a for a, b in itertools.pairwise(reserved)]
        assert all(0.7 < g < 1.3 for g in gaps), reserved

    async def test_acquire_many_is_acquire_in_a_row(self, limiter: RateLimiter) -> None:
        # 10 per minute (a slot every 6 s), 15 at once with max_wait 20 s: ten pass,
        # three get the slots 6, 12 and 18 s ahead, two are told to ask again in ~4 s.
        got = await limiter.acquire_many("m", 10, 60.0, 15, max_wait=20.0)
        assert len(got) == 15
        assert all(d.allowed for d in got[:10]), got
        reserved = got[10:13]
        assert all(d.reserved and not d.allowed for d in reserved), got
        for n, d in enumerate(reserved, 1):
            assert 6.0 * n - 1.0 < d.retry_after <= 6.0 * n + 0.01, got
        assert all(not d.allowed and not d.reserved and 3.0 < d.retry_after <= 4.01
                   for d in got[13:]), got
        # The slots taken count for the next caller too.
        after = await limiter.acquire("m", 10, 60.0, max_wait=20.0)
        assert not after.allowed and not after.reserved
        assert (await limiter.acquire_many("m", 10, 60.0, 0)) == []

    async def test_concurrent_batches_never_exceed_the_limit(
            self, limiter: RateLimiter) -> None:
        batches = await asyncio.gather(
            *(limiter.acquire_many("cb", 25, 60.0, 7) for _ in range(10)))
        assert sum(d.allowed for batch in batches for d in batch) == 25

