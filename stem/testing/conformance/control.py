"""The ControlChannel and HeartbeatStore contracts (:class:`stem.ports.ControlChannel`,
:class:`stem.ports.HeartbeatStore`) as test classes any adapter can run: subclass them
and give them a ``control_factory`` / ``heartbeat_factory`` fixture."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from stem.ports import ControlChannel, HeartbeatStore
from stem.testing import eventually

__all__ = ["ControlChannelConformance", "HeartbeatStoreConformance"]


async def _made(factory: Callable[[], Any | Awaitable[Any]]) -> Any:
    made = factory()
    return await made if inspect.isawaitable(made) else made


class ControlChannelConformance:
    """The checks every :class:`stem.ports.ControlChannel` passes."""

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def channel(self, control_factory: Callable[[], Any]) -> AsyncIterator[ControlChannel]:
        ch = await _made(control_factory)
        try:
            yield ch
        finally:
            await ch.close()

    async def test_a_reader_sees_what_comes_after_its_position(
            self, channel: ControlChannel) -> None:
        await channel.publish(b"before")
        pos = await channel.position()
        assert (await channel.read(pos, 0))[1] == []
        await channel.publish(b"one")
        await channel.publish(b"two")
        got = await eventually(lambda: _some(channel.read(pos, 1.0)), timeout=5)
        assert got is not None
        pos2, msgs = got
        while len(msgs) < 2:
            pos2, more = await channel.read(pos2, 1.0)
            msgs += more
        assert msgs == [b"one", b"two"]
        assert (await channel.read(pos2, 0.05))[1] == []

    async def test_every_reader_gets_every_message(self, channel: ControlChannel) -> None:
        starts = [await channel.position() for _ in range(3)]
        readers = [asyncio.ensure_future(channel.read(p, 5.0)) for p in starts]
        await asyncio.sleep(0.05)  # the readers are waiting
        t0 = time.monotonic()
        await channel.publish(b"to all")
        got = await asyncio.gather(*readers)
        assert [m for _, m in got] == [[b"to all"]] * 3
        assert time.monotonic() - t0 < 2.0  # woken, not at the end of the wait

    async def test_a_read_waits_at_most_its_timeout(self, channel: ControlChannel) -> None:
        pos = await channel.position()
        t0 = time.monotonic()
        new_pos, msgs = await channel.read(pos, 0.3)
        assert msgs == [] and 0.25 <= time.monotonic() - t0 < 3
        await channel.publish(b"x")
        got = await eventually(lambda: _some(channel.read(new_pos, 1.0)))
        assert got is not None and got[1] == [b"x"]


async def _some(read: Awaitable[tuple[str, list[bytes]]]) -> tuple[str, list[bytes]] | None:
    pos, msgs = await read
    return (pos, msgs) if msgs else None


class HeartbeatStoreConformance:
    """The checks every :class:`stem.ports.HeartbeatStore` passes."""

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def beats(self, heartbeat_factory: Callable[[], Any]) -> AsyncIterator[HeartbeatStore]:
        store = await _made(heartbeat_factory)
        try:
            yield store
        finally:
            await store.close()

    async def test_latest_per_worker_until_expired_or_removed(
            self, beats: HeartbeatStore) -> None:
        assert await beats.current() == []
        await beats.put("w1", b'{"workerId":"w1","n":1}', 60)
        await beats.put("w1", b'{"workerId":"w1","n":2}', 60)
        await beats.put("w2", b'{"workerId":"w2"}', 0.3)
        assert sorted(await beats.current()) == [b'{"workerId":"w1","n":2}',
                                                 b'{"workerId":"w2"}']

        async def expired() -> bool:
            return await beats.current() == [b'{"workerId":"w1","n":2}']

        assert await eventually(expired, timeout=5)
        await beats.remove("w1")
        assert await beats.current() == []
