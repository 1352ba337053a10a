"""Memory adapter specifics (the shared contract is in tests/conformance/)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

import stem.adapters.memory as memory
from stem.adapters import backend_from_url, broker_from_url
from stem.envelope import Envelope
from stem.errors import ConfigurationError, EnvelopeDecodeError
from stem.status import TaskState, TaskStatus


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    memory.reset()
    yield
    memory.reset()


def test_same_url_gives_the_same_instance() -> None:
    assert broker_from_url("memory://a") is broker_from_url("memory://a")
    assert backend_from_url("memory://a") is backend_from_url("memory://a")
    assert broker_from_url("memory://a") is not broker_from_url("memory://b")
    assert broker_from_url("memory://") is broker_from_url("memory://default")
    assert broker_from_url("memory://a", namespace="x") is not broker_from_url("memory://a")


def test_reset_forgets_instances() -> None:
    before = broker_from_url("memory://a")
    memory.reset()
    assert broker_from_url("memory://a") is not before


def test_rejects_other_schemes() -> None:
    with pytest.raises(ConfigurationError):
        memory.broker_from_url("redis://localhost")


@pytest.mark.parametrize("url", ["memory://a?x=1", "memory://a?x", "memory://a#b"])
def test_options_are_refused_not_ignored(url: str) -> None:
    # The memory adapter takes no options; "memory://a?x=1" used to be a store named
    # "a" with the option silently dropped.
    with pytest.raises(ConfigurationError, match="takes none"):
        broker_from_url(url)
    with pytest.raises(ConfigurationError, match="takes none"):
        backend_from_url(url)


async def test_stored_priority_and_lease_are_bounded() -> None:
    broker = broker_from_url("memory://bounds")
    raw = Envelope(name="t", args={"i": 0}).to_json()
    await broker.publish_raw("q", raw, priority=9)
    await broker.publish_raw("q", Envelope(name="t", args={"i": 1}).to_json(), priority=10**9)
    got = await broker.fetch(["q"], 2, block=0, consumer="w")
    assert [d.envelope.args["i"] for d in got if d.envelope] == [0, 1]  # both band 9: FIFO
    await broker.extend_lease(got, float("inf"))
    assert all(d.lease_expires_at is not None and d.lease_expires_at < time.time() + 8 * 86_400
               for d in got)


async def test_app_and_worker_share_queues_and_results() -> None:
    producer, worker = broker_from_url("memory://shared"), broker_from_url("memory://shared")
    await producer.publish([Envelope(name="t")])
    await producer.close()  # closing one user must not drop the shared data
    assert len(await worker.fetch(["default"], 1, block=0, consumer="w")) == 1
    await backend_from_url("memory://shared").set_many(
        [(TaskStatus(id="r", state=TaskState.SUCCEEDED), None)]
    )
    assert await backend_from_url("memory://shared").get("r") is not None


async def test_unserialisable_batch_stores_nothing() -> None:
    broker = broker_from_url("memory://x")
    bad = Envelope(name="t", args={"when": object()})
    with pytest.raises(EnvelopeDecodeError):
        await broker.publish([Envelope(name="t"), bad])
    assert (await broker.stats("default")).pending == 0


async def test_deliveries_are_fresh_objects() -> None:
    broker = broker_from_url("memory://x")
    await broker.publish([Envelope(name="t", args={"items": [1]})])
    [d] = await broker.fetch(["default"], 1, block=0, consumer="c")
    assert d.envelope is not None
    d.envelope.args["items"].append(2)
    await broker.nack([d])
    [again] = await broker.fetch(["default"], 1, block=0, consumer="c")
    assert again.envelope is not None and again.envelope.args == {"items": [1]}


async def test_publish_from_another_thread_wakes_a_blocked_fetch() -> None:
    broker = broker_from_url("memory://x")
    published_at: list[float] = []

    def other_thread() -> None:
        time.sleep(0.2)  # the fetch must be blocked by then: that's the case under test
        published_at.append(time.monotonic())
        asyncio.run(broker.publish([Envelope(name="t")]))

    thread = threading.Thread(target=other_thread)
    thread.start()
    got = await broker.fetch(["default"], 1, block=5, consumer="c")
    returned = time.monotonic()
    thread.join()
    assert len(got) == 1
    assert returned - published_at[0] < 0.5


async def test_result_from_another_thread_wakes_wait() -> None:
    backend = backend_from_url("memory://x")

    def other_thread() -> None:
        time.sleep(0.2)  # the wait must be waiting by then: that's the case under test
        asyncio.run(backend.set_many([(TaskStatus(id="t", state=TaskState.FAILED), None)]))

    thread = threading.Thread(target=other_thread)
    thread.start()
    start = time.monotonic()
    got = await backend.wait("t", timeout=5)
    thread.join()
    assert got is not None and got.state is TaskState.FAILED
    assert time.monotonic() - start < 1.0


def test_instance_survives_its_event_loop() -> None:
    """Users' tests each run a new loop against the same memory:// URL."""
    broker = broker_from_url("memory://x")
    backend = backend_from_url("memory://x")

    async def first() -> None:
        # Leave a blocked fetch and wait behind by timing them out.
        assert await broker.fetch(["default"], 1, block=0.05, consumer="c") == []
        assert await backend.wait("t", timeout=0.05) is None
        await broker.publish([Envelope(name="t")])

    async def second() -> None:
        assert len(await broker.fetch(["default"], 1, block=1, consumer="c")) == 1
        waiter = asyncio.create_task(backend.wait("t", timeout=5))
        await backend.set_many([(TaskStatus(id="t", state=TaskState.SUCCEEDED), None)])
        assert (await waiter) is not None

    asyncio.run(first())
    asyncio.run(second())
