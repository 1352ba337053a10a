"""The Broker contract (:class:`stem.ports.Broker`) as a test class any adapter can run.

Subclass :class:`BrokerConformance` in a test module (its name must start with
``Test``) and give it a ``broker_factory`` fixture; see docs/conformance.md::

    class TestMyBroker(BrokerConformance):
        @pytest.fixture
        def broker_factory(self) -> BrokerFactory:
            return lambda: MyBroker(...)

Needs pytest and pytest-asyncio (any ``asyncio_mode``). The checks use real time
(leases of a fraction of a second, blocking fetches), so run them against a real
server, as Stem's own suite does.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta

import pytest
import pytest_asyncio

from stem._time import now_epoch, utcnow
from stem.envelope import Envelope
from stem.ports import Broker, Delivery, QueueStats
from stem.testing import eventually

__all__ = ["BrokerConformance", "BrokerFactory"]

#: Builds the broker under test (or an awaitable of it), on storage no other test
#: uses: a fresh schema, key prefix, file or name per test.
BrokerFactory = Callable[[], Broker | Awaitable[Broker]]

Q = "conf"


def env(i: int = 0, **kw: object) -> Envelope:
    kw.setdefault("queue", Q)
    return Envelope(name="conf.task", args={"i": i}, **kw)  # type: ignore[arg-type]


async def fetch_now(broker: Broker, n: int = 100, queues: Sequence[str] = (Q,)) -> list[Delivery]:
    return await broker.fetch(list(queues), n, block=0, consumer="c1")


async def fetch_within(
    broker: Broker, timeout: float = 5.0, queues: Sequence[str] = (Q,), consumer: str = "c1"
) -> list[Delivery]:
    """Poll until something is delivered (fails after ``timeout``)."""
    return await eventually(
        lambda: broker.fetch(list(queues), 1, block=0.05, consumer=consumer), timeout=timeout
    )


async def _after(t: float) -> bool:
    return now_epoch() > t


def stats_tuple(s: QueueStats) -> tuple[int, int, int, int]:
    return (s.pending, s.delayed, s.in_flight, s.dead)


async def _turns(fetch: Awaitable[list[Delivery]]) -> tuple[int, list[Delivery]]:
    """Run ``fetch`` to the end: how many event-loop turns it took, and its result."""
    task = asyncio.ensure_future(fetch)
    turns = 0
    while not task.done():
        await asyncio.sleep(0)
        turns += 1
    return turns, task.result()


async def _cancel_after(fetch: asyncio.Task[list[Delivery]], turns: int) -> list[Delivery]:
    """Cancel ``fetch`` after ``turns`` event-loop turns: its result when it finished
    first, [] when the cancellation ended it."""
    for _ in range(turns):
        await asyncio.sleep(0)
    fetch.cancel()
    try:
        return await fetch
    except asyncio.CancelledError:
        return []


def _cancel_points(longest: int) -> list[int]:
    """The loop turns to cancel a fetch at when an uncancelled one took up to ``longest``:
    each of the first 200, then 100 spread over the rest of twice ``longest``."""
    end = 2 * longest + 2
    return list(range(min(end, 200))) + list(range(200, end, max(1, (end - 200) // 100)))


class BrokerConformance:
    """The checks every :class:`stem.ports.Broker` passes (Stem's four adapters do).

    A subclass provides the ``broker_factory`` fixture (:data:`BrokerFactory`); each
    test builds one broker with it and closes it at the end.
    """

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def broker(self, broker_factory: BrokerFactory) -> AsyncIterator[Broker]:
        """The broker under test, closed after the test."""
        made = broker_factory()
        b = await made if inspect.isawaitable(made) else made
        try:
            yield b
        finally:
            await b.close()

    async def test_publish_fetch_ack(self, broker: Broker) -> None:
        e = env(7, priority=3, meta={"k": "v"}, headers={"h": "1"})
        await broker.publish([e])
        [d] = await fetch_now(broker)
        assert d.envelope is not None and d.decode_error is None
        assert (d.envelope.id, d.envelope.name, d.envelope.args) == (e.id, e.name, {"i": 7})
        assert (d.envelope.meta, d.envelope.headers, d.envelope.priority) == ({"k": "v"}, {"h": "1"}, 3)
        assert d.queue == Q and d.raw
        assert d.lease_expires_at is not None and d.lease_expires_at > now_epoch()
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 1, 0)
        await broker.ack([d])
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)
        assert await fetch_now(broker) == []


    async def test_queues_are_separate(self, broker: Broker) -> None:
        await broker.publish([env(1, queue="a")])
        assert await fetch_now(broker, queues=["b"]) == []
        [d] = await fetch_now(broker, queues=["a"])
        assert d.queue == "a"


    async def test_batch_publish_fetch_and_ack_many(self, broker: Broker) -> None:
        envelopes = [env(i) for i in range(300)]
        await broker.publish(envelopes)
        assert (await broker.stats(Q)).pending == 300
        got: list[Delivery] = []
        while batch := await fetch_now(broker, 64):
            assert len(batch) <= 64
            got.extend(batch)
        ids = [d.envelope.id for d in got if d.envelope]
        assert sorted(ids) == sorted(e.id for e in envelopes)
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 300, 0)
        await broker.ack(got)
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_fetch_respects_max_count(self, broker: Broker) -> None:
        await broker.publish([env(i) for i in range(10)])
        assert len(await fetch_now(broker, 3)) == 3
        assert len(await broker.fetch([Q], 1, block=0, consumer="c")) == 1
        s = await broker.stats(Q)
        assert (s.pending, s.in_flight) == (6, 4)


    async def test_expired_lease_is_redelivered(self, broker: Broker) -> None:
        e = env(visibility_timeout=0.3)
        await broker.publish([e])
        [first] = await fetch_now(broker)
        fetched_at = time.monotonic()
        assert await fetch_now(broker) == []  # leased, so invisible
        [again] = await fetch_within(broker, consumer="c2")
        assert time.monotonic() - fetched_at >= 0.25
        assert again.envelope is not None and again.envelope.id == e.id
        assert again.envelope.attempt == e.attempt  # redelivery is not a retry
        assert again.receipt != first.receipt


    async def test_redelivered_flag(self, broker: Broker) -> None:
        """False only when the stored message was certainly never delivered before."""
        e = env(visibility_timeout=0.3)
        await broker.publish([e])
        [first] = await fetch_now(broker)
        assert first.redelivered is False
        [expired] = await fetch_within(broker, consumer="c2")
        assert expired.redelivered is True
        await broker.nack([expired])
        [nacked] = await fetch_now(broker)
        assert nacked.redelivered is True
        await broker.retry([(nacked, e.copy(attempt=1))])
        [replacement] = await fetch_now(broker)
        assert replacement.redelivered is False
        await broker.dead_letter([(replacement, "x")])
        await broker.replay_dead_letters(Q)
        [replayed] = await fetch_now(broker)
        assert replayed.redelivered is False


    async def test_stale_lease_holder_cannot_touch_the_new_lease(self, broker: Broker) -> None:
        await broker.publish([env(visibility_timeout=0.3)])
        [stale] = await fetch_now(broker)
        [current] = await fetch_within(broker, consumer="c2")
        await broker.ack([stale])
        await broker.nack([stale])
        await broker.dead_letter([(stale, "stale")])
        await broker.retry([(stale, env(attempt=1))])
        stale_until = stale.lease_expires_at
        await broker.extend_lease([stale], 60)
        assert stale.lease_expires_at == stale_until  # a lost lease's deadline is left alone
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 1, 0)
        # The current holder's calls still work.
        await broker.extend_lease([current], 60)
        assert current.lease_expires_at is not None
        assert current.lease_expires_at > now_epoch() + 50
        await broker.ack([current])
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_extend_lease_prevents_redelivery(self, broker: Broker) -> None:
        await broker.publish([env(visibility_timeout=0.3)])
        [d] = await fetch_now(broker)
        await broker.extend_lease([d], 30)
        # Well past the original 0.3 s lease: still leased, so nothing comes back.
        assert await broker.fetch([Q], 1, block=0.8, consumer="c2") == []
        assert (await broker.stats(Q)).in_flight == 1
        await broker.ack([d])
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_extend_lease_moves_the_deadline_of_the_delivery(self, broker: Broker) -> None:
        await broker.publish([env(visibility_timeout=1)])
        [d] = await fetch_now(broker)
        assert d.lease_expires_at is not None
        before = d.lease_expires_at
        await broker.extend_lease([d], 100)
        assert before + 90 <= d.lease_expires_at <= now_epoch() + 101


    async def test_extend_lease_can_shorten_a_lease(self, broker: Broker) -> None:
        """``now + seconds`` also when that is sooner than the lease it replaces."""
        await broker.publish([env(visibility_timeout=60)])
        [d] = await fetch_now(broker)
        await broker.extend_lease([d], 0.3)
        assert d.lease_expires_at is not None and d.lease_expires_at <= now_epoch() + 0.5
        extended = time.monotonic()
        [again] = await fetch_within(broker, consumer="c2")
        assert time.monotonic() - extended >= 0.25
        assert again.envelope is not None and again.redelivered


    async def test_nack_makes_envelope_visible_at_once(self, broker: Broker) -> None:
        e = env(visibility_timeout=60)
        await broker.publish([e])
        [d] = await fetch_now(broker)
        await broker.nack([d])
        assert stats_tuple(await broker.stats(Q)) == (1, 0, 0, 0)
        [again] = await fetch_now(broker)
        assert again.envelope is not None
        assert again.envelope.to_dict() == e.to_dict()


    async def test_retry_acks_and_publishes_replacement(self, broker: Broker) -> None:
        e = env(max_retries=3)
        await broker.publish([e])
        [d] = await fetch_now(broker)
        due = utcnow() + timedelta(seconds=0.5)
        await broker.retry([(d, e.copy(attempt=1, not_before=due))])
        assert stats_tuple(await broker.stats(Q)) == (0, 1, 0, 0)
        assert await fetch_now(broker) == []
        [again] = await fetch_within(broker)
        assert now_epoch() >= due.timestamp() - 0.01
        assert again.envelope is not None
        assert (again.envelope.id, again.envelope.attempt) == (e.id, 1)
        await broker.ack([again])
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_delayed_envelope_waits_for_not_before(self, broker: Broker) -> None:
        due = utcnow() + timedelta(seconds=0.5)
        late = env(1, not_before=due)
        await broker.publish([late, env(2)])
        assert stats_tuple(await broker.stats(Q)) == (1, 1, 0, 0)
        [now_ready] = await fetch_now(broker)
        assert now_ready.envelope is not None and now_ready.envelope.args == {"i": 2}
        assert await fetch_now(broker) == []
        [d] = await fetch_within(broker)
        assert now_epoch() >= due.timestamp() - 0.01
        assert d.envelope is not None and d.envelope.id == late.id


    async def test_past_not_before_is_ready_now(self, broker: Broker) -> None:
        await broker.publish([env(not_before=utcnow() - timedelta(seconds=5))])
        assert len(await fetch_now(broker)) == 1


    async def test_higher_priority_first_then_publish_order(self, broker: Broker) -> None:
        prios = [0, 5, 9, 1, 5, 9, 0]
        await broker.publish([env(i, priority=p) for i, p in enumerate(prios)])
        order = []
        for _ in prios:
            [d] = await broker.fetch([Q], 1, block=0, consumer="c")
            assert d.envelope is not None
            order.append(d.envelope.args["i"])
        assert order == [2, 5, 1, 4, 3, 0, 6]


    async def test_earlier_queue_is_preferred(self, broker: Broker) -> None:
        await broker.publish([env(1, queue="low"), env(2, queue="high")])
        [d] = await broker.fetch(["high", "low"], 1, block=0, consumer="c")
        assert d.queue == "high"


    async def test_queue_order_comes_before_priority(self, broker: Broker) -> None:
        """An earlier queue's jobs go first, whatever the priorities of a later queue's;
        priority orders the jobs within each queue."""
        await broker.publish([
            env(1, queue="later", priority=9),
            env(2, queue="first", priority=0),
            env(3, queue="first", priority=5),
            env(4, queue="later", priority=5),
            env(5, queue="first", priority=1),
        ])
        got = await broker.fetch(["first", "later"], 2, block=0, consumer="c")
        assert [(d.queue, d.envelope.args["i"]) for d in got if d.envelope] == [
            ("first", 3), ("first", 5)
        ]
        await broker.nack(got)
        got = await broker.fetch(["first", "later"], 10, block=0, consumer="c")
        assert [(d.queue, d.envelope.args["i"]) for d in got if d.envelope] == [
            ("first", 3), ("first", 5), ("first", 2), ("later", 1), ("later", 4)
        ]


    async def test_busy_first_queue_does_not_starve_the_others(self, broker: Broker) -> None:
        await broker.publish([env(i, queue="busy") for i in range(30)])
        await broker.publish([env(99, queue="quiet")])
        served = []
        for _ in range(30):
            [d] = await broker.fetch(["busy", "quiet"], 1, block=0, consumer="c")
            served.append(d.queue)
            await broker.ack([d])
        assert served[0] == "busy"
        assert "quiet" in served  # served while "busy" still had work


    async def test_multi_queue_fetch_fills_from_several_queues(self, broker: Broker) -> None:
        await broker.publish(
            [env(i, queue="a") for i in range(2)] + [env(i, queue="b") for i in range(3)]
        )
        got = await broker.fetch(["a", "b"], 10, block=0, consumer="c")
        assert sorted(d.queue for d in got) == ["a", "a", "b", "b", "b"]


    async def test_blocking_fetch_returns_early_on_publish(self, broker: Broker) -> None:
        published_at: list[float] = []

        async def publish_later() -> None:
            await asyncio.sleep(0.2)  # the fetch must be blocked by then: that's the case under test
            published_at.append(time.monotonic())
            await broker.publish([env(1)])

        start = time.monotonic()
        publisher = asyncio.create_task(publish_later())
        got = await broker.fetch([Q], 1, block=5, consumer="c")
        returned = time.monotonic()
        await publisher
        assert len(got) == 1
        assert returned - published_at[0] < 0.5
        assert returned - start < 1.5


    async def test_blocking_fetch_gives_up_after_block(self, broker: Broker) -> None:
        start = time.monotonic()
        assert await broker.fetch([Q], 1, block=0.3, consumer="c") == []
        assert 0.25 <= time.monotonic() - start < 2.0


    async def test_blocking_fetch_returns_when_delayed_envelope_comes_due(
        self, broker: Broker
    ) -> None:
        await broker.ping()  # connect (and migrate) first, so only the delay is timed
        due = utcnow() + timedelta(seconds=0.3)
        await broker.publish([env(not_before=due)])
        got = await broker.fetch([Q], 1, block=5, consumer="c")
        assert len(got) == 1
        late = (utcnow() - due).total_seconds()
        assert -0.05 <= late < 1.2


    async def test_dead_letter_list_replay_purge(self, broker: Broker) -> None:
        e = env(1, attempt=2, max_retries=5)
        await broker.publish([e])
        [d] = await fetch_now(broker)
        before = now_epoch()
        await broker.dead_letter([(d, "unknown task 'conf.task'")])
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 1)
        assert await fetch_now(broker) == []

        [dl] = await broker.dead_letters(Q)
        assert dl.queue == Q and dl.reason == "unknown task 'conf.task'"
        assert dl.raw == d.raw
        assert dl.envelope is not None and dl.envelope.id == e.id and dl.envelope.attempt == 2
        assert before - 1 <= dl.dead_at <= now_epoch() + 1

        assert await broker.replay_dead_letters(Q) == 1
        assert stats_tuple(await broker.stats(Q)) == (1, 0, 0, 0)
        [again] = await fetch_now(broker)
        assert again.envelope is not None
        assert (again.envelope.id, again.envelope.attempt, again.envelope.args) == (e.id, 0, {"i": 1})

        await broker.dead_letter([(again, "second time")])
        assert await broker.purge_dead_letters(Q) == 1
        assert await broker.dead_letters(Q) == []
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_dead_letters_oldest_first_with_limits(self, broker: Broker) -> None:
        envelopes = [env(i) for i in range(3)]
        await broker.publish(envelopes)
        for i in range(3):
            [d] = await broker.fetch([Q], 1, block=0, consumer="c")
            await broker.dead_letter([(d, f"reason {i}")])
        assert [dl.reason for dl in await broker.dead_letters(Q)] == [
            "reason 0",
            "reason 1",
            "reason 2",
        ]
        assert [dl.reason for dl in await broker.dead_letters(Q, limit=2)] == ["reason 0", "reason 1"]
        assert await broker.dead_letters("elsewhere") == []
        assert await broker.replay_dead_letters(Q, limit=2) == 2
        assert [dl.reason for dl in await broker.dead_letters(Q)] == ["reason 2"]
        assert stats_tuple(await broker.stats(Q)) == (2, 0, 0, 1)


    async def test_dead_letters_page_by_offset_and_since(self, broker: Broker) -> None:
        await broker.publish([env(i) for i in range(4)])
        for i in range(3):
            [d] = await broker.fetch([Q], 1, block=0, consumer="c")
            await broker.dead_letter([(d, f"reason {i}")])
        *_, third = await broker.dead_letters(Q)
        # Wait a few milliseconds after the third (stores keep dead_at to the millisecond).
        await eventually(lambda: _after(third.dead_at + 0.02), timeout=5)
        [d] = await broker.fetch([Q], 1, block=0, consumer="c")
        await broker.dead_letter([(d, "reason 3")])
        reasons = [dl.reason for dl in await broker.dead_letters(Q, limit=2, offset=1)]
        assert reasons == ["reason 1", "reason 2"]
        assert await broker.dead_letters(Q, offset=10) == []
        last = (await broker.dead_letters(Q, offset=3))[0]
        assert last.dead_at > third.dead_at + 0.01
        since = (third.dead_at + last.dead_at) / 2
        assert [dl.reason for dl in await broker.dead_letters(Q, since=since)] == ["reason 3"]
        # Replay with the same filter takes only the late one.
        assert await broker.replay_dead_letters(Q, since=since) == 1
        assert [dl.reason for dl in await broker.dead_letters(Q)] == [
            "reason 0", "reason 1", "reason 2"]

    async def test_get_and_replay_dead_letters_by_id_with_delay(self, broker: Broker) -> None:
        envelopes = [env(i, attempt=3, max_retries=3) for i in range(3)]
        await broker.publish(envelopes)
        for d in await fetch_now(broker, 3):
            await broker.dead_letter([(d, "max-retries-exhausted: RuntimeError: down")])
        one = await broker.get_dead_letter(Q, envelopes[1].id)
        assert one is not None and one.id == envelopes[1].id
        # Read back as the Dart Stem shows it: the code, and the error in meta.
        assert one.reason == "max-retries-exhausted"
        assert one.meta["error"] == "RuntimeError: down"
        assert one.envelope is not None and one.envelope.args == {"i": 1}
        assert await broker.get_dead_letter(Q, "no-such-id") is None
        assert await broker.get_dead_letter("elsewhere", envelopes[1].id) is None

        ids = [envelopes[0].id, envelopes[2].id, "no-such-id"]
        assert await broker.replay_dead_letters(Q, ids=ids, delay=60) == 2
        # Delayed by a minute, attempt back to 0; the other one is still dead.
        assert stats_tuple(await broker.stats(Q)) == (0, 2, 0, 1)
        assert [dl.id for dl in await broker.dead_letters(Q)] == [envelopes[1].id]
        assert await broker.replay_dead_letters(Q, ids=[envelopes[1].id], limit=1) == 1
        [again] = await fetch_now(broker)
        assert again.envelope is not None
        assert (again.envelope.id, again.envelope.attempt) == (envelopes[1].id, 0)
        assert again.redelivered is False
        assert await broker.replay_dead_letters(Q, ids=[envelopes[1].id]) == 0

    async def test_malformed_bytes_are_delivered_with_decode_error(self, broker: Broker) -> None:
        raw = b'{"not": "an envelope"'
        await broker.publish_raw(Q, raw)
        [d] = await fetch_now(broker)
        assert d.envelope is None
        assert isinstance(d.decode_error, str) and d.decode_error
        assert d.raw == raw
        await broker.dead_letter([(d, f"undecodable: {d.decode_error}")])
        [dl] = await broker.dead_letters(Q)
        assert dl.envelope is None and dl.raw == raw and dl.reason.startswith("undecodable")


    async def test_valid_object_missing_fields_is_a_decode_error(self, broker: Broker) -> None:
        await broker.publish_raw(Q, b'{"id": "abc", "args": {}}')
        [d] = await fetch_now(broker)
        assert d.envelope is None and d.decode_error


    async def test_publish_raw_of_a_foreign_envelope_decodes(self, broker: Broker) -> None:
        e = env(5, priority=4)
        await broker.publish_raw(Q, e.to_json(), priority=4)
        [d] = await fetch_now(broker)
        assert d.envelope is not None and d.envelope.to_dict() == e.to_dict()


    async def test_stats_counts_every_state(self, broker: Broker) -> None:
        later = utcnow() + timedelta(seconds=60)
        await broker.publish([env(1), env(2), env(3), env(4, not_before=later)])
        [leased] = await broker.fetch([Q], 1, block=0, consumer="c")
        [dead] = await broker.fetch([Q], 1, block=0, consumer="c")
        await broker.dead_letter([(dead, "x")])
        assert await broker.stats(Q) == QueueStats(queue=Q, pending=1, delayed=1, in_flight=1, dead=1)
        assert await broker.stats("never-used") == QueueStats(queue="never-used")
        await broker.ack([leased])


    async def test_purge_drops_ready_and_delayed_but_not_leased(self, broker: Broker) -> None:
        later = utcnow() + timedelta(seconds=60)
        await broker.publish([env(i) for i in range(4)] + [env(9, not_before=later)])
        [leased] = await broker.fetch([Q], 1, block=0, consumer="c")
        await broker.publish([env(1, queue="other")])
        assert await broker.purge(Q) == 4
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 1, 0)
        assert (await broker.stats("other")).pending == 1
        assert await broker.purge(Q) == 0
        await broker.ack([leased])
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_concurrent_consumers_never_share_a_lease(self, broker: Broker) -> None:
        envelopes = [env(i) for i in range(200)]
        await broker.publish(envelopes)

        async def consume(name: str) -> list[str]:
            ids: list[str] = []
            while batch := await broker.fetch([Q], 7, block=0.05, consumer=name):
                ids.extend(d.envelope.id for d in batch if d.envelope)
            return ids

        results = await asyncio.gather(*(consume(f"c{i}") for i in range(4)))
        flat = [i for ids in results for i in ids]
        assert len(flat) == len(set(flat)) == 200
        assert set(flat) == {e.id for e in envelopes}


    async def test_a_cancelled_fetch_never_strands_what_it_claimed(self, broker: Broker) -> None:
        """Cancelled at any point of its life (before, while or after the store leases the
        message), a fetch that has ended holds nothing: another consumer takes the message
        at once, not when the 60 s lease expires. The cancellation is tried at every
        event-loop turn an uncancelled fetch takes (see _cancel_points)."""
        await broker.publish([env(1, visibility_timeout=60)])
        longest = 0
        for _ in range(3):
            turns, got = await _turns(broker.fetch([Q], 1, block=0, consumer="victim"))
            assert len(got) == 1
            await broker.nack(got)
            longest = max(longest, turns)
        for turns in _cancel_points(longest):
            fetch = asyncio.create_task(broker.fetch([Q], 1, block=0, consumer="victim"))
            await broker.nack(await _cancel_after(fetch, turns))
            [d] = await broker.fetch([Q], 1, block=0, consumer="other")
            await broker.nack([d])


    async def test_a_cancelled_blocking_fetch_never_strands_what_woke_it(self, broker: Broker) -> None:
        """As above for a fetch waiting on an empty queue, cancelled at every turn of its
        wake-up by a publish."""
        await broker.ping()
        # A head start long enough for a fetch to be waiting when the publish comes.
        head_start = 2 * max([(await _turns(fetch_now(broker)))[0] for _ in range(3)]) + 2

        async def woken(cancel_at: int | None) -> tuple[int, list[Delivery]]:
            fetch = asyncio.create_task(broker.fetch([Q], 1, block=10, consumer="victim"))
            for _ in range(head_start):
                await asyncio.sleep(0)
            publish = asyncio.ensure_future(broker.publish([env(visibility_timeout=60)]))
            if cancel_at is None:
                turns, got = await _turns(fetch)
            else:
                turns, got = cancel_at, await _cancel_after(fetch, cancel_at)
            await publish
            return turns, got

        longest = 0
        for _ in range(3):
            turns, got = await woken(None)
            assert len(got) == 1
            await broker.ack(got)
            longest = max(longest, turns)
        for turns in _cancel_points(longest):
            _, got = await woken(turns)
            if not got:
                got = await broker.fetch([Q], 1, block=0, consumer="other")
            assert len(got) == 1
            await broker.ack(got)
        assert stats_tuple(await broker.stats(Q)) == (0, 0, 0, 0)


    async def test_ping_and_close(self, broker: Broker) -> None:
        await broker.ping()
        assert broker.default_visibility_timeout > 0

