"""The RevokeStore contract (:class:`stem.ports.RevokeStore`) as a test class any
adapter can run: subclass :class:`RevokeStoreConformance` and give it a
``revoke_store_factory`` fixture (see docs/conformance.md)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio

from stem._time import utcnow
from stem.envelope import Envelope
from stem.ports import Broker, RevokeStore
from stem.revoke import RevokeEntry

__all__ = ["BrokerDeleteConformance", "RevokeStoreConformance", "RevokeStoreFactory"]

#: Builds the revoke store under test (or an awaitable of it), on storage no other
#: test uses.
RevokeStoreFactory = Callable[[], RevokeStore | Awaitable[RevokeStore]]


def _entry(task_id: str, version: int, **kw: object) -> RevokeEntry:
    return RevokeEntry(task_id=task_id, version=version, issued_at=utcnow(), **kw)  # type: ignore[arg-type]


class RevokeStoreConformance:
    """The checks every :class:`stem.ports.RevokeStore` passes (Stem's adapters do)."""

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def revokes(self, revoke_store_factory: RevokeStoreFactory
                      ) -> AsyncIterator[RevokeStore]:
        """The revoke store under test, closed after the test."""
        made = revoke_store_factory()
        store = await made if inspect.isawaitable(made) else made
        try:
            yield store
        finally:
            await store.close()

    async def test_empty(self, revokes: RevokeStore) -> None:
        assert await revokes.entries() == []
        assert await revokes.changed_since(0) == []

    async def test_round_trip_keeps_every_field(self, revokes: RevokeStore) -> None:
        expires = utcnow() + timedelta(hours=1)
        e = _entry("t1", 10, terminate=True, reason="bad input", requested_by="ops@host",
                   expires_at=expires)
        await revokes.upsert_many([e])
        [got] = await revokes.entries()
        assert (got.task_id, got.version, got.terminate, got.reason, got.requested_by) == (
            "t1", 10, True, "bad input", "ops@host")
        assert got.expires_at is not None
        assert abs((got.expires_at - expires).total_seconds()) < 0.002
        assert abs((got.issued_at - e.issued_at).total_seconds()) < 0.002
        assert not got.is_expired()

    async def test_the_higher_version_wins_in_either_order(self, revokes: RevokeStore) -> None:
        await revokes.upsert_many([_entry("a", 5, reason="five")])
        await revokes.upsert_many([_entry("a", 3, reason="three")])
        await revokes.upsert_many([_entry("b", 3, reason="three"), _entry("c", 1)])
        await revokes.upsert_many([_entry("b", 7, reason="seven")])
        await revokes.upsert_many([_entry("c", 1, reason="same version")])
        got = {e.task_id: e for e in await revokes.entries()}
        assert got["a"].reason == "five" and got["a"].version == 5
        assert got["b"].reason == "seven" and got["b"].version == 7
        assert got["c"].reason is None  # an equal version changes nothing

    async def test_concurrent_writers_keep_the_highest(self, revokes: RevokeStore) -> None:
        await asyncio.gather(*(revokes.upsert_many([_entry("x", v, reason=str(v))])
                               for v in (4, 9, 1, 7, 3, 8)))
        [got] = await revokes.entries()
        assert (got.version, got.reason) == (9, "9")

    async def test_entries_come_by_version(self, revokes: RevokeStore) -> None:
        await revokes.upsert_many([_entry("late", 30), _entry("early", 10), _entry("mid", 20)])
        assert [e.task_id for e in await revokes.entries()] == ["early", "mid", "late"]

    async def test_changed_since(self, revokes: RevokeStore) -> None:
        await revokes.upsert_many([_entry("a", 100), _entry("b", 200)])
        assert [e.task_id for e in await revokes.changed_since(100)] == ["b"]
        assert await revokes.changed_since(200) == []
        await revokes.upsert_many([_entry("a", 300, terminate=True)])
        changed = await revokes.changed_since(200)
        assert [(e.task_id, e.terminate) for e in changed] == [("a", True)]
        assert [e.task_id for e in await revokes.changed_since(0)] == ["b", "a"]

    async def test_prune_expired(self, revokes: RevokeStore) -> None:
        now = utcnow()
        await revokes.upsert_many([
            _entry("gone", 1, expires_at=now - timedelta(seconds=1)),
            _entry("at-now", 2, expires_at=now),
            _entry("later", 3, expires_at=now + timedelta(hours=1)),
            _entry("forever", 4),
        ])
        listed = {e.task_id: e for e in await revokes.entries()}
        assert listed["gone"].is_expired(now) and listed["at-now"].is_expired(now)
        assert await revokes.prune_expired(now) == 2
        assert sorted(e.task_id for e in await revokes.entries()) == ["forever", "later"]
        assert await revokes.prune_expired(now) == 0

    async def test_a_resume_style_rewrite_expires_an_entry(self, revokes: RevokeStore) -> None:
        await revokes.upsert_many([_entry("q", 1)])
        await revokes.upsert_many([_entry("q", 2, expires_at=utcnow())])
        [got] = await revokes.changed_since(1)
        assert got.is_expired()


class BrokerDeleteConformance:
    """``Broker.delete``: dropping waiting envelopes by task id (``stem purge --id``).
    Uses the broker suite's ``broker_factory`` fixture."""

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def broker(self, broker_factory: Any) -> AsyncIterator[Any]:
        made = broker_factory()
        b = await made if inspect.isawaitable(made) else made
        try:
            yield b
        finally:
            await b.close()

    async def test_delete_ready_delayed_and_released_by_id(self, broker: Broker) -> None:
        q = "conf-del"
        soon = utcnow() + timedelta(hours=1)
        ready = [Envelope(name="t", queue=q, args={"i": i}) for i in range(3)]
        delayed = Envelope(name="t", queue=q, not_before=soon)
        leased = Envelope(name="t", queue=q, priority=9)
        nacked = Envelope(name="t", queue=q, priority=8)
        await broker.publish([leased, nacked])
        held = await broker.fetch([q], 2, block=0, consumer="c1")
        assert {d.envelope.id for d in held if d.envelope} == {leased.id, nacked.id}
        await broker.nack([d for d in held if d.envelope and d.envelope.id == nacked.id])
        await broker.publish([*ready, delayed])
        gone = [ready[1].id, delayed.id, leased.id, nacked.id, "no-such-id"]
        assert await broker.delete(q, gone) == 3  # the leased one stays
        assert await broker.delete(q, []) == 0
        assert await broker.delete("other-queue", [ready[0].id]) == 0
        stats = await broker.stats(q)
        assert (stats.pending, stats.delayed, stats.in_flight) == (2, 0, 1)
        got = await broker.fetch([q], 10, block=0, consumer="c2")
        assert sorted(d.envelope.id for d in got if d.envelope) == sorted(
            [ready[0].id, ready[2].id])
