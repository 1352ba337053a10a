"""The GroupStore contract (:class:`stem.ports.GroupStore`) as a test class any adapter
can run: subclass :class:`GroupStoreConformance` and give it a ``group_store_factory``
fixture (see docs/conformance.md)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from stem.groups import GroupMember
from stem.ports import GroupStore
from stem.status import TaskError, TaskState
from stem.testing import eventually

__all__ = ["GroupStoreConformance", "GroupStoreFactory"]

#: Builds the group store under test (or an awaitable of it), on storage no other test uses.
GroupStoreFactory = Callable[[], GroupStore | Awaitable[GroupStore]]

OK, FAILED = TaskState.SUCCEEDED, TaskState.FAILED


def member(index: int, state: TaskState = OK, result: object = None) -> GroupMember:
    error = None if state is OK else TaskError("ValueError", f"member {index} broke")
    return GroupMember(index, f"t{index}", state, result, error)


class GroupStoreConformance:
    """The checks every :class:`stem.ports.GroupStore` passes (Stem's four adapters do)."""

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def groups(self, group_store_factory: GroupStoreFactory) -> AsyncIterator[GroupStore]:
        """The group store under test, closed after the test."""
        made = group_store_factory()
        g = await made if inspect.isawaitable(made) else made
        try:
            yield g
        finally:
            await g.close()

    async def test_create_once_and_read_back(self, groups: GroupStore) -> None:
        assert await groups.create("g", 3, {"stem.batch": True, "ids": ["a", "b"]}, 60)
        assert not await groups.create("g", 5, {}, 60)  # exists: unchanged
        record = await groups.get("g")
        assert record is not None
        assert (record.id, record.expected, record.completed, record.failed) == ("g", 3, 0, 0)
        assert record.meta == {"stem.batch": True, "ids": ["a", "b"]}
        assert record.members == [] and not record.claimed and record.state == "pending"
        assert await groups.get("missing") is None

    async def test_members_count_once_and_read_in_index_order(self, groups: GroupStore) -> None:
        await groups.create("g", 3, {}, 60)
        p = await groups.add_result("g", member(2, result={"v": 2}))
        assert p is not None and (p.completed, p.failed, p.added, p.complete) == (1, 0, True,
                                                                                  False)
        again = await groups.add_result("g", member(2, result="a later redelivery"))
        assert again is not None and (again.completed, again.added) == (1, False)
        await groups.add_result("g", member(0, result=[0]))
        last = await groups.add_result("g", member(1, result=None))
        assert last is not None and last.complete and last.all_succeeded and last.added
        record = await groups.get("g")
        assert record is not None and record.state == "succeeded"
        assert [(m.index, m.task_id, m.result) for m in record.members] == [
            (0, "t0", [0]), (1, "t1", None), (2, "t2", {"v": 2})]  # the first record won

    async def test_unknown_group_records_nothing(self, groups: GroupStore) -> None:
        assert await groups.add_result("nope", member(0)) is None
        assert not await groups.claim_callback("nope")
        assert await groups.get("nope") is None

    async def test_a_failed_member_is_counted_and_blocks_the_claim(
            self, groups: GroupStore) -> None:
        await groups.create("g", 2, {}, 60)
        await groups.add_result("g", member(0))
        p = await groups.add_result("g", member(1, FAILED))
        assert p is not None and p.complete and p.failed == 1 and not p.all_succeeded
        assert not await groups.claim_callback("g")
        record = await groups.get("g")
        assert record is not None and record.state == "failed"
        assert record.members[1].error is not None
        assert record.members[1].error.message == "member 1 broke"
        assert record.counts() == {"succeeded": 1, "failed": 1}

    async def test_claim_only_when_complete_and_only_once(self, groups: GroupStore) -> None:
        await groups.create("g", 2, {}, 60)
        await groups.add_result("g", member(0))
        assert not await groups.claim_callback("g")  # not complete yet
        await groups.add_result("g", member(1))
        claims = await asyncio.gather(*(groups.claim_callback("g") for _ in range(20)))
        assert claims.count(True) == 1
        assert not await groups.claim_callback("g")
        record = await groups.get("g")
        assert record is not None and record.claimed

    async def test_concurrent_members_complete_the_group_exactly_once(
            self, groups: GroupStore) -> None:
        n = 50
        await groups.create("g", n, {}, 60)
        progress = await asyncio.gather(
            *(groups.add_result("g", member(i, result=i)) for i in range(n)),
            *(groups.add_result("g", member(i, result=-1)) for i in range(0, n, 5)))
        completing = [p for p in progress if p is not None and p.added and p.complete]
        assert len(completing) == 1
        assert sum(1 for p in progress if p is not None and p.added) == n
        record = await groups.get("g")
        assert record is not None and record.completed == n
        assert [m.index for m in record.members] == list(range(n))
        assert all(m.result in (m.index, -1) for m in record.members)  # one of the two

    async def test_records_expire(self, groups: GroupStore) -> None:
        await groups.create("g", 1, {}, 0.3)
        await groups.add_result("g", member(0))

        async def gone() -> bool:
            return await groups.get("g") is None

        await eventually(gone, timeout=5)
        assert await groups.add_result("g", member(0)) is None
        assert await groups.create("g", 1, {"new": True}, 60)  # the id is free again
        record = await groups.get("g")
        assert record is not None and record.meta == {"new": True} and record.members == []
