"""The LockStore contract (:class:`stem.ports.LockStore`) as a test class any adapter
can run: subclass :class:`LockConformance` and give it a ``lock_store_factory``
fixture (see docs/conformance.md)."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from stem.ports import LockStore
from stem.testing import eventually

__all__ = ["LockConformance", "LockStoreFactory"]

#: Builds the lock store under test (or an awaitable of it), on storage no other test
#: uses.
LockStoreFactory = Callable[[], LockStore | Awaitable[LockStore]]

#: A lease no test outlives.
LONG = 60.0
#: A lease that runs out during a test (checked with a poll, never a fixed sleep).
SHORT = 0.2


class LockConformance:
    """The checks every :class:`stem.ports.LockStore` passes (Stem's adapters do).

    A subclass provides the ``lock_store_factory`` fixture (:data:`LockStoreFactory`);
    each test builds one lock store with it and closes it at the end.
    """

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def locks(self, lock_store_factory: LockStoreFactory) -> AsyncIterator[LockStore]:
        """The lock store under test, closed after the test."""
        made = lock_store_factory()
        store = await made if inspect.isawaitable(made) else made
        try:
            yield store
        finally:
            await store.close()

    async def test_acquire_a_free_key(self, locks: LockStore) -> None:
        assert await locks.owner_of("k") is None
        assert await locks.acquire("k", "a", LONG)
        assert await locks.owner_of("k") == "a"

    async def test_a_held_key_is_contended(self, locks: LockStore) -> None:
        assert await locks.acquire("k", "a", LONG)
        assert not await locks.acquire("k", "b", LONG)
        assert await locks.owner_of("k") == "a"

    async def test_keys_are_independent(self, locks: LockStore) -> None:
        assert await locks.acquire("k1", "a", LONG)
        assert await locks.acquire("k2", "b", LONG)
        assert await locks.owner_of("k1") == "a" and await locks.owner_of("k2") == "b"
        assert await locks.owner_of("k3") is None

    async def test_the_owner_acquiring_again_extends(self, locks: LockStore) -> None:
        assert await locks.acquire("k", "a", SHORT)
        assert await locks.acquire("k", "a", LONG)
        # The short lease would have run out by now: staying held is what's under test.
        await asyncio.sleep(SHORT * 2.5)
        assert await locks.owner_of("k") == "a"
        assert not await locks.acquire("k", "b", LONG)

    async def test_an_expired_lock_is_taken_over(self, locks: LockStore) -> None:
        assert await locks.acquire("k", "a", SHORT)

        async def taken() -> bool:
            return await locks.acquire("k", "b", LONG)

        await eventually(taken, timeout=5)
        assert await locks.owner_of("k") == "b"
        # The old holder can neither extend nor free the new holder's lock.
        assert not await locks.renew("k", "a", LONG)
        assert not await locks.release("k", "a")
        assert await locks.owner_of("k") == "b"

    async def test_an_expired_lock_has_no_owner(self, locks: LockStore) -> None:
        assert await locks.acquire("k", "a", SHORT)

        async def free() -> bool:
            return await locks.owner_of("k") is None

        await eventually(free, timeout=5)
        assert not await locks.renew("k", "a", LONG)  # too late: it is not held
        assert not await locks.release("k", "a")
        assert await locks.acquire("k", "b", LONG)

    async def test_renew_by_the_owner_only(self, locks: LockStore) -> None:
        assert not await locks.renew("k", "a", LONG)  # nothing to renew
        assert await locks.acquire("k", "a", SHORT)
        assert not await locks.renew("k", "b", LONG)
        assert await locks.renew("k", "a", LONG)
        await asyncio.sleep(SHORT * 2.5)  # past the first lease: renewed, still held
        assert await locks.owner_of("k") == "a"
        assert not await locks.acquire("k", "b", LONG)

    async def test_release_by_the_owner_only(self, locks: LockStore) -> None:
        assert not await locks.release("k", "a")  # nothing to release
        assert await locks.acquire("k", "a", LONG)
        assert not await locks.release("k", "b")
        assert await locks.owner_of("k") == "a"
        assert await locks.release("k", "a")
        assert await locks.owner_of("k") is None
        assert not await locks.release("k", "a")
        assert await locks.acquire("k", "b", LONG)

    async def test_eight_concurrent_acquirers_exactly_one_wins(self, locks: LockStore) -> None:
        for key in ("race-1", "race-2", "race-3"):
            won = await asyncio.gather(*(locks.acquire(key, f"o{n}", LONG) for n in range(8)))
            assert won.count(True) == 1
            assert await locks.owner_of(key) == f"o{won.index(True)}"

    async def test_keys_and_owners_with_any_characters(self, locks: LockStore) -> None:
        key, owner = "stem:schedule:{a b}:ü/%", "host-1:pid 7 {x}"
        assert await locks.acquire(key, owner, LONG)
        assert await locks.owner_of(key) == owner
        assert await locks.owner_of("stem:schedule:{a b}") is None
        assert await locks.renew(key, owner, LONG)
        assert await locks.release(key, owner)

    async def test_a_bad_ttl_is_refused(self, locks: LockStore) -> None:
        for ttl in (0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError):
                await locks.acquire("k", "a", ttl)
            with pytest.raises(ValueError):
                await locks.renew("k", "a", ttl)
        assert await locks.owner_of("k") is None
