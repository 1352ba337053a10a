"""Redis adapter behaviour beyond the conformance suite: the key layout, leases
(XAUTOCLAIM, per-envelope and extended leases, owner checks), the delayed-work
mover waking a blocked fetch, NOSCRIPT reloads, dead letters, URL parsing and
failing fast / reconnecting when the server goes away.

Shared-server tests use the ``redis_url`` fixture with the ``namespace`` fixture
as key prefix (their keys are deleted afterwards). Tests that flush scripts, kill
connections or stop the server get a private redis-server of their own.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from urllib.parse import urlencode

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot

from stem._time import from_epoch, now_epoch, utcnow
from stem.adapters import backend_from_url, broker_from_url
from stem.adapters.redis import RedisBackend, RedisBroker, parse_redis_url
from stem.adapters.redis._connection import safe_url
from stem.adapters.redis.broker import RedisLease
from stem.envelope import Envelope
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.ports import Delivery
from stem.status import TaskState, TaskStatus
from tests import services
from tests.helpers import capture_stem_logs, eventually
from tests.services import drop_redis_keys

pytestmark = pytest.mark.redis

Q = "q"


def with_params(url: str, **params: object) -> str:
    """``url`` with query parameters added."""
    return url + ("&" if "?" in url else "?") + urlencode({k: str(v) for k, v in params.items()})


def env(i: int = 0, **kw: object) -> Envelope:
    kw.setdefault("queue", Q)
    return Envelope(name="t.task", args={"i": i}, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def raw(redis_url: str, namespace: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test server; the namespace's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
    await drop_redis_keys(redis_url, namespace)


@pytest.fixture
async def make_broker(
    redis_url: str, namespace: str, raw: aioredis.Redis
) -> AsyncIterator[object]:
    """Factory for brokers on the test server, closed afterwards."""
    made: list[RedisBroker] = []

    def make(**params: object) -> RedisBroker:
        params.setdefault("claim_interval", 0.05)
        b = broker_from_url(with_params(redis_url, **params), namespace=namespace)
        assert isinstance(b, RedisBroker)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


@pytest.fixture
async def broker(make_broker: object) -> RedisBroker:
    return make_broker()  # type: ignore[operator, no-any-return]


async def fetch_within(
    broker: RedisBroker, consumer: str = "c2", timeout: float = 5.0, queues: list[str] | None = None
) -> list[Delivery]:
    return await eventually(
        lambda: broker.fetch(queues or [Q], 1, block=0.05, consumer=consumer), timeout=timeout
    )


async def pending_row(raw: aioredis.Redis, broker: RedisBroker, d: Delivery) -> tuple[str, int]:
    """(consumer, delivery count) of a delivery's entry in the group's pending list."""
    assert isinstance(d.lease, RedisLease)
    band, eid = d.lease.band, d.lease.entry_id
    [row] = await raw.xpending_range(broker.keys(d.queue).streams[band], "stem", eid, eid, 1)
    return row["consumer"].decode(), row["times_delivered"]


# -- key layout -------------------------------------------------------------------------


async def test_every_key_of_a_queue_shares_one_hash_tag(
    broker: RedisBroker, raw: aioredis.Redis, namespace: str
) -> None:
    """Exercise every structure: bands, delayed, long lease, nacked, dead letters."""
    await broker.publish(
        [env(i, priority=i) for i in range(10)]
        + [env(99, not_before=utcnow() + timedelta(seconds=60)), env(50, visibility_timeout=120)]
    )
    got = await broker.fetch([Q], 20, block=0, consumer="c1")
    assert len(got) == 11
    await broker.nack(got[:1])
    await broker.dead_letter([(got[1], "x")])
    await broker.extend_lease(got[2:3], 300)
    keys = sorted([k.decode() async for k in raw.scan_iter(match=f"*{namespace}*", count=1000)])
    tag = "{" + f"{namespace}:{Q}" + "}"
    assert keys and all(k.startswith(tag + ":") for k in keys), keys
    assert {key_slot(k.encode()) for k in keys} == {key_slot(tag.encode())}
    suffixes = {k[len(tag) + 1 :] for k in keys}
    assert {"delayed", "leases", "released", "dead"} <= suffixes
    assert {f"stream:{b}" for b in range(10)} <= suffixes


async def test_acked_entries_are_deleted_from_the_stream(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    await broker.publish([env(i) for i in range(50)])
    got = await broker.fetch([Q], 50, block=0, consumer="c1")
    assert await raw.xlen(broker.keys(Q).streams[0]) == 50
    await broker.ack(got)
    assert await raw.xlen(broker.keys(Q).streams[0]) == 0
    assert (await broker.stats(Q)).in_flight == 0


async def test_publish_raw_stores_the_bytes_unchanged(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    payload = b'{"id": "x",   "name": "t.task", "args": {}, "weird": [1, 2]}'
    await broker.publish_raw(Q, payload, priority=7)
    [(_, fields)] = await raw.xrange(broker.keys(Q).streams[7])
    assert fields == {b"p": payload}
    [d] = await broker.fetch([Q], 1, block=0, consumer="c1")
    assert d.raw == payload and d.envelope is not None and d.envelope.extra == {"weird": [1, 2]}


# -- leases -----------------------------------------------------------------------------


async def test_xautoclaim_reclaims_after_the_visibility_timeout(
    make_broker: object, raw: aioredis.Redis
) -> None:
    broker: RedisBroker = make_broker(default_visibility_timeout=0.3)  # type: ignore[operator]
    await broker.publish([env()])
    [first] = await broker.fetch([Q], 1, block=0, consumer="c1")
    assert first.redelivered is False
    fetched = time.monotonic()
    assert await pending_row(raw, broker, first) == ("c1", 1)
    [again] = await fetch_within(broker, "c2")
    assert time.monotonic() - fetched >= 0.28
    assert again.redelivered is True and again.receipt != first.receipt
    assert await pending_row(raw, broker, again) == ("c2", 2)


async def test_extend_lease_past_the_horizon_is_kept_until_its_deadline(
    make_broker: object,
) -> None:
    """Horizon 0.3 s; a 1.2 s extension must hold although the claimer runs all along."""
    broker: RedisBroker = make_broker(default_visibility_timeout=0.3)  # type: ignore[operator]
    await broker.publish([env()])
    [d] = await broker.fetch([Q], 1, block=0, consumer="c1")
    start = time.monotonic()
    await broker.extend_lease([d], 1.2)
    assert d.lease_expires_at is not None and d.lease_expires_at >= now_epoch() + 1.1
    assert await broker.fetch([Q], 1, block=0.8, consumer="c2") == []
    [again] = await fetch_within(broker, "c2")
    assert time.monotonic() - start >= 1.15
    assert again.envelope is not None and again.redelivered


async def test_envelope_visibility_timeout_longer_than_the_horizon(make_broker: object) -> None:
    broker: RedisBroker = make_broker(default_visibility_timeout=0.2)  # type: ignore[operator]
    await broker.publish([env(visibility_timeout=1.0)])
    [d] = await broker.fetch([Q], 1, block=0, consumer="c1")
    assert d.lease_expires_at is not None and d.lease_expires_at >= now_epoch() + 0.9
    start = time.monotonic()
    assert await broker.fetch([Q], 1, block=0.6, consumer="c2") == []
    await fetch_within(broker, "c2")
    assert time.monotonic() - start >= 0.85


async def test_lease_of_an_envelope_read_by_the_blocking_path(make_broker: object) -> None:
    """Entries that arrive while a fetch is blocked get their own lease too."""
    broker: RedisBroker = make_broker(default_visibility_timeout=30)  # type: ignore[operator]
    producer: RedisBroker = make_broker()  # type: ignore[operator]

    async def publish_when_blocked() -> None:
        await eventually(lambda: asyncio.sleep(0, bool(broker._readers)))
        await producer.publish([env(visibility_timeout=0.3)])

    task = asyncio.create_task(publish_when_blocked())
    [d] = await broker.fetch([Q], 1, block=5, consumer="c1")
    await task
    assert d.lease_expires_at is not None and d.lease_expires_at < now_epoch() + 0.5
    start = time.monotonic()
    [again] = await fetch_within(broker, "c2", timeout=3)
    assert time.monotonic() - start < 1.0
    assert again.redelivered


async def test_stale_ack_after_reclaim_leaves_the_new_delivery(
    make_broker: object, raw: aioredis.Redis
) -> None:
    """Same consumer name both times: only the delivery count tells the leases apart."""
    broker: RedisBroker = make_broker(default_visibility_timeout=0.2)  # type: ignore[operator]
    await broker.publish([env()])
    [stale] = await broker.fetch([Q], 1, block=0, consumer="c1")
    [current] = await fetch_within(broker, "c1")
    assert isinstance(stale.lease, RedisLease) and isinstance(current.lease, RedisLease)
    # Same entry, same consumer.
    assert stale.lease[:3] == current.lease[:3]
    await broker.ack([stale])
    await broker.retry([(stale, env(attempt=1))])
    await broker.dead_letter([(stale, "stale")])
    await broker.nack([stale])
    s = await broker.stats(Q)
    assert (s.pending, s.delayed, s.in_flight, s.dead) == (0, 0, 1, 0)
    assert await pending_row(raw, broker, current) == ("c1", 2)
    await broker.ack([current])
    s = await broker.stats(Q)
    assert (s.pending, s.in_flight) == (0, 0)


async def test_nack_keeps_the_entry_and_its_place(broker: RedisBroker, raw: aioredis.Redis) -> None:
    await broker.publish([env(i) for i in range(3)])
    [a, b, c] = await broker.fetch([Q], 3, block=0, consumer="c1")
    await broker.nack([b])
    await broker.publish([env(3)])
    got = await broker.fetch([Q], 5, block=0, consumer="c2")
    assert [d.envelope.args["i"] for d in got if d.envelope] == [1, 3]
    # The same stream entry, not a copy.
    assert isinstance(got[0].lease, RedisLease) and isinstance(b.lease, RedisLease)
    assert got[0].lease.entry_id == b.lease.entry_id
    await broker.ack([a, c, *got])
    assert await raw.xlen(broker.keys(Q).streams[0]) == 0


async def test_a_fetch_cancelled_after_its_claim_script_ran_hands_the_entries_back(
    broker: RedisBroker,
) -> None:
    await broker.publish([env(i, visibility_timeout=60) for i in range(3)])
    scripts = broker._script
    real_fetch = scripts["fetch"]
    claimed, release = asyncio.Event(), asyncio.Event()

    async def held_fetch(keys: list[str], args: list[object]) -> object:
        reply = await real_fetch(keys, args)
        claimed.set()
        await release.wait()  # the entries are leased; the fetch is cancelled here
        return reply

    scripts["fetch"] = held_fetch  # type: ignore[assignment]
    fetch = asyncio.create_task(broker.fetch([Q], 3, block=0, consumer="c1"))
    await asyncio.wait_for(claimed.wait(), 5)
    assert (await broker.stats(Q)).in_flight == 3
    fetch.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    scripts["fetch"] = real_fetch
    # Handed back before the cancelled fetch ended, not when the 60 s leases expire.
    assert (await broker.stats(Q)).in_flight == 0
    assert len(await broker.fetch([Q], 3, block=0, consumer="c2")) == 3


async def test_a_cancelled_blocking_read_ends_at_once(make_broker: object) -> None:
    broker: RedisBroker = make_broker(block_time=30)  # type: ignore[operator]
    fetch = asyncio.create_task(broker.fetch([Q], 1, block=30, consumer="c1"))

    async def reading() -> bool:
        return any(r.client_id is not None for r in broker._readers)

    await eventually(reading, timeout=5)
    started = time.monotonic()
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert time.monotonic() - started < 1.0  # CLIENT UNBLOCK, not the 30 s read timeout
    assert not broker._readers
    await broker.publish([env()])
    assert len(await broker.fetch([Q], 1, block=0, consumer="c2")) == 1


# -- delayed work -----------------------------------------------------------------------


async def test_retry_delayed_200ms_wakes_a_blocked_fetch_in_time(broker: RedisBroker) -> None:
    await broker.publish([env()])
    [d] = await broker.fetch([Q], 1, block=0, consumer="c1")
    assert d.envelope is not None
    fetcher = asyncio.create_task(broker.fetch([Q], 1, block=5, consumer="c1"))
    await eventually(lambda: asyncio.sleep(0, bool(broker._readers)))  # blocked in XREADGROUP
    start = time.monotonic()
    await broker.retry([(d, d.envelope.copy(attempt=1, not_before=from_epoch(now_epoch() + 0.2)))])
    [again] = await fetcher
    took = time.monotonic() - start
    assert 0.18 <= took < 0.3, took
    assert again.envelope is not None and again.envelope.attempt == 1


async def test_delayed_envelope_from_another_process_is_moved_when_due(
    make_broker: object, raw: aioredis.Redis
) -> None:
    consumer: RedisBroker = make_broker(block_time=0.1)  # type: ignore[operator]
    producer: RedisBroker = make_broker()  # type: ignore[operator]
    await producer.publish([env(not_before=utcnow() + timedelta(seconds=0.3))])
    assert await raw.zcard(consumer.keys(Q).delayed) == 1
    start = time.monotonic()
    [d] = await consumer.fetch([Q], 1, block=3, consumer="c1")
    assert 0.25 <= time.monotonic() - start < 0.6
    assert await raw.zcard(consumer.keys(Q).delayed) == 0
    assert d.envelope is not None and d.redelivered is False


async def test_many_due_envelopes_are_moved_in_batches(broker: RedisBroker) -> None:
    past = utcnow() + timedelta(milliseconds=50)
    await broker.publish([env(i, not_before=past) for i in range(1200)])
    await asyncio.sleep(0.06)  # let them come due (the wait itself is what's tested next)
    got: list[Delivery] = []
    while len(got) < 1200:
        batch = await broker.fetch([Q], 500, block=1, consumer="c1")
        assert batch
        got.extend(batch)
    assert sorted(d.envelope.args["i"] for d in got if d.envelope) == list(range(1200))


# -- priorities and several queues ------------------------------------------------------


async def test_bands_are_read_highest_first_across_a_batch(broker: RedisBroker) -> None:
    await broker.publish([env(i, priority=i % 10) for i in range(40)])
    got = await broker.fetch([Q], 40, block=0, consumer="c1")
    prios = [d.envelope.priority for d in got if d.envelope]
    assert prios == sorted(prios, reverse=True)


async def test_blocking_fetch_on_several_queues_wakes_on_any(broker: RedisBroker) -> None:
    producer_ready = asyncio.Event()

    async def publish_when_blocked() -> None:
        await eventually(lambda: asyncio.sleep(0, bool(broker._readers)))
        producer_ready.set()
        await broker.publish([env(1, queue="b", priority=4)])

    task = asyncio.create_task(publish_when_blocked())
    start = time.monotonic()
    [d] = await broker.fetch(["a", "b", "c"], 5, block=5, consumer="c1")
    await task
    assert d.queue == "b" and time.monotonic() - start < 1.0


async def test_multi_queue_fetch_prefers_earlier_queues_but_serves_all(
    broker: RedisBroker,
) -> None:
    await broker.publish([env(i, queue="hi") for i in range(100)])
    await broker.publish([env(i, queue="lo", priority=9) for i in range(5)])
    served: list[str] = []
    for _ in range(20):
        batch = await broker.fetch(["hi", "lo"], 3, block=0, consumer="c1")
        served.extend(d.queue for d in batch)
        await broker.ack(batch)
    assert served[:3] == ["hi"] * 3
    assert served.count("lo") == 5


# -- dead letters and stats -------------------------------------------------------------


async def test_dead_letter_stream_keeps_bytes_reason_and_time(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    await broker.publish_raw(Q, b"not json")
    await broker.publish([env(1)])
    [bad, good] = await broker.fetch([Q], 2, block=0, consumer="c1")
    assert bad.envelope is None and bad.decode_error
    before = now_epoch()
    await broker.dead_letter([(bad, "undecodable"), (good, "unknown task")])
    [(eid, fields), _] = await raw.xrange(broker.keys(Q).dead)
    assert fields[b"p"] == b"not json" and fields[b"r"] == b"undecodable"
    assert before - 1 <= int(fields[b"t"]) / 1000 <= now_epoch() + 1
    dls = await broker.dead_letters(Q)
    assert [dl.reason for dl in dls] == ["undecodable", "unknown task"]
    assert dls[0].meta == {"entry_id": eid.decode()} and dls[0].id == eid.decode()
    assert dls[1].envelope is not None and dls[1].id == dls[1].envelope.id
    # The undecodable one stays (it could only fail again); the other goes back.
    assert await broker.replay_dead_letters(Q) == 1
    assert [dl.reason for dl in await broker.dead_letters(Q)] == ["undecodable"]
    assert await broker.purge_dead_letters(Q) == 1


async def test_stats_count_nacked_as_ready(broker: RedisBroker) -> None:
    await broker.publish([env(i, priority=i) for i in range(4)])
    got = await broker.fetch([Q], 3, block=0, consumer="c1")
    await broker.nack(got[:2])
    s = await broker.stats(Q)
    assert (s.pending, s.in_flight) == (3, 1)
    assert await broker.purge(Q) == 3
    s = await broker.stats(Q)
    assert (s.pending, s.in_flight) == (0, 1)


# -- URLs and connection failures -------------------------------------------------------


def test_url_parsing_standalone_tls_cluster_and_options() -> None:
    s = parse_redis_url("redis://:s3cret@db.example:6380/3?claim_interval=0.2&socket_timeout=5")
    assert s.mode == "standalone"
    kw = s.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["password"]) == ("db.example", 6380, 3, "s3cret")
    assert kw["socket_timeout"] == 5.0 and "claim_interval" not in kw
    assert s.seconds("claim_interval", 1.0) == 0.2 and s.seconds("block_time", 1.5) == 1.5
    assert "s3cret" not in s.safe_url and "***" in s.safe_url

    # No per-command deadline unless asked: TCP keepalive (and TCP_USER_TIMEOUT) finds a
    # dead server instead of a 5 s wait_for around every command.
    plain = parse_redis_url("redis://127.0.0.1:6379/0").connection_kwargs
    assert plain["socket_timeout"] is None and plain["socket_keepalive"] is True
    assert plain["socket_keepalive_options"][socket.TCP_KEEPIDLE] == 15
    assert plain["socket_keepalive_options"][socket.TCP_USER_TIMEOUT] == 30_000

    for bad in ("socket_timeout=0", "socket_connect_timeout=-1", "socket_timeout=inf"):
        with pytest.raises(ConfigurationError, match="positive number of seconds"):
            parse_redis_url(f"redis://127.0.0.1:6379/0?{bad}")

    tls = parse_redis_url("rediss://user:pw@secure.example:6390/0?ssl_cert_reqs=none")
    assert tls.connection_kwargs["connection_class"] is SSLConnection
    assert tls.connection_kwargs["username"] == "user"

    cl = parse_redis_url("redis://node1:7000?cluster=1")
    assert cl.mode == "cluster" and cl.nodes == (("node1", 7000),)
    assert not {"db", "port", "host", "cluster"} & set(cl.connection_kwargs)


def test_url_parsing_sentinel() -> None:
    s = parse_redis_url(
        "redis+sentinel://:pw@s1:26379,s2:26380,s3/mymaster/2?sentinel_password=sp&ssl=1"
    )
    assert s.mode == "sentinel"
    assert s.nodes == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert s.service_name == "mymaster"
    assert s.connection_kwargs["db"] == 2 and s.connection_kwargs["password"] == "pw"
    assert s.connection_kwargs["ssl"] is True
    assert s.sentinel_kwargs["password"] == "sp" and s.sentinel_kwargs["ssl"] is True
    # built without I/O
    b = broker_from_url("redis+sentinel://s1:26379/mymaster")
    assert isinstance(b, RedisBroker)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",  # no service name
        "redis+sentinel://s1:26379/svc/notadb",
        "redis://host:6379/0?claim_interval=-1",
        "redis://host:6379/0?block_time=soon",
        "redis://:6379/0",  # no host
        "redis://host:notaport/0",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        broker_from_url(url)


def test_safe_url_hides_the_password() -> None:
    assert safe_url("redis://u:p%40ss@h:1/0") == "redis://u:***@h:1/0"
    assert safe_url("redis://h:1/0") == "redis://h:1/0"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server_fails_fast_with_a_helpful_message() -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    broker = broker_from_url(url)  # no I/O yet
    backend = backend_from_url(url)
    try:
        for what, call in (
            ("broker", broker.ping()),
            ("result backend", backend.ping()),
            ("broker", broker.fetch([Q], 1, block=0, consumer="c")),
            ("broker", broker.publish([env()])),
            ("result backend", backend.get("x")),
        ):
            start = time.monotonic()
            with pytest.raises(ServiceUnavailableError) as info:
                await call
            assert time.monotonic() - start < 3
            msg = str(info.value)
            assert what in msg and "127.0.0.1" in msg and "hunter2" not in msg
            assert "check the server is running" in msg
    finally:
        await broker.close()
        await backend.close()


async def test_fetch_retries_until_block_runs_out_then_raises() -> None:
    broker = broker_from_url(f"redis://127.0.0.1:{closed_port()}/0")
    try:
        with capture_stem_logs() as logs:
            start = time.monotonic()
            with pytest.raises(ServiceUnavailableError):
                await broker.fetch([Q], 1, block=0.5, consumer="c")
            assert 0.45 <= time.monotonic() - start < 2.5
        assert [e["event"] for e in logs] == ["broker.unavailable"]
    finally:
        await broker.close()


# -- private servers: NOSCRIPT, killed connections, restarts ----------------------------


class PrivateRedis:
    """A redis-server this test owns (can be stopped and started on the same port)."""

    def __init__(self) -> None:
        self.port = closed_port()
        self.dir = tempfile.mkdtemp(prefix="stem-redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [services.redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


async def test_noscript_after_script_flush_is_reloaded(private_redis: PrivateRedis) -> None:
    broker = broker_from_url(private_redis.url)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        await broker.publish([env(1), env(2)])
        [d] = await broker.fetch([Q], 1, block=0, consumer="c1")
        await admin.script_flush()
        assert await admin.script_exists(broker._script["ack"].sha) == [False]
        await broker.ack([d])  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA
        [d2] = await broker.fetch([Q], 1, block=0, consumer="c1")
        await broker.ack([d2])
        assert (await broker.stats(Q)).in_flight == 0
    finally:
        await admin.aclose()
        await broker.close()


async def test_blocked_fetch_survives_a_killed_connection(private_redis: PrivateRedis) -> None:
    broker = broker_from_url(private_redis.url)
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        fetcher = asyncio.create_task(broker.fetch([Q], 1, block=5, consumer="c1"))
        await eventually(lambda: asyncio.sleep(0, bool(broker._readers)))
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await broker.publish([env(7)])
        [d] = await asyncio.wait_for(fetcher, 5)
        assert d.envelope is not None and d.envelope.args == {"i": 7}
    finally:
        await admin.aclose()
        await broker.close()


async def test_fetch_recovers_after_a_server_restart(private_redis: PrivateRedis) -> None:
    broker = broker_from_url(private_redis.url)
    try:
        await broker.publish([env(1)])
        [d] = await broker.fetch([Q], 1, block=0, consumer="c1")
        await broker.ack([d])
        private_redis.stop()
        with capture_stem_logs() as logs:
            with pytest.raises(ServiceUnavailableError):
                await broker.fetch([Q], 1, block=0.3, consumer="c1")
            private_redis.start()  # empty again: no persistence
            await broker.publish([env(2)])
            [d] = await broker.fetch([Q], 1, block=2, consumer="c1")
        assert d.envelope is not None and d.envelope.args == {"i": 2}
        events = [e["event"] for e in logs]
        assert events.count("broker.unavailable") == 1
        assert "broker.reconnected" in events
    finally:
        await broker.close()


async def test_wait_survives_a_killed_pubsub_connection(private_redis: PrivateRedis) -> None:
    backend = backend_from_url(private_redis.url)
    admin = aioredis.Redis.from_url(private_redis.url)
    assert isinstance(backend, RedisBackend)
    try:
        waiter = asyncio.create_task(backend.wait("t1", timeout=10))
        async def subscribed() -> bool:
            return bool((await admin.pubsub_numsub(backend.key("t1")))[0][1])

        await eventually(subscribed)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(subscribed)  # re-subscribed after reconnecting
        await backend.set_many([(TaskStatus("t1", TaskState.SUCCEEDED, payload=1), None)])
        got = await asyncio.wait_for(waiter, 5)
        assert got is not None and got.payload == 1
    finally:
        await admin.aclose()
        await backend.close()


# -- result backend ---------------------------------------------------------------------


async def test_backend_ttl_and_layout(
    redis_url: str, namespace: str, raw: aioredis.Redis
) -> None:
    backend = backend_from_url(with_params(redis_url, result_ttl=120), namespace=namespace)
    try:
        assert backend.default_ttl == 120
        await backend.set_many(
            [(TaskStatus("a", TaskState.RUNNING), None), (TaskStatus("b", TaskState.QUEUED), 0.5)]
        )
        assert 119_000 < await raw.pttl(f"{namespace}:result:a") <= 120_000
        assert 0 < await raw.pttl(f"{namespace}:result:b") <= 500
        assert set(await backend.get_many(["a", "b", "a", "zz"])) == {"a", "b"}
    finally:
        await backend.close()


# -- closing ----------------------------------------------------------------------------


async def test_close_ends_a_blocked_fetch_and_forgets_idle_consumers(
    make_broker: object, raw: aioredis.Redis
) -> None:
    broker: RedisBroker = make_broker()  # type: ignore[operator]
    other: RedisBroker = make_broker()  # type: ignore[operator]
    await broker.publish([env(1), env(2)])
    [held] = await other.fetch([Q], 1, block=0, consumer="busy")
    [d] = await broker.fetch([Q], 1, block=0, consumer="done")
    await broker.ack([d])
    fetcher = asyncio.create_task(broker.fetch([Q], 1, block=10, consumer="done"))
    await eventually(lambda: asyncio.sleep(0, bool(broker._readers)))
    start = time.monotonic()
    await broker.close()
    assert await asyncio.wait_for(fetcher, 2) == []
    assert time.monotonic() - start < 1.0
    names = {
        c["name"].decode()
        for band in range(10)
        for c in await raw.xinfo_consumers(broker.keys(Q).streams[band], "stem")
    }
    assert "done" not in names and "busy" in names  # "busy" still holds a delivery
    await other.ack([held])


async def test_surplus_of_a_blocking_read_is_handed_back(broker: RedisBroker) -> None:
    """Entries that land in several streams between the fetch script and the blocking
    read come back together; only max_count are kept, the rest are nacked in place."""
    await broker._ensure_groups(["a", "b"])
    await broker.publish([env(1, queue="a"), env(2, queue="b", priority=3), env(3, queue="b")])
    start = time.monotonic()
    got = await broker._block(["a", "b"], 1, "c1", 2.0)
    assert time.monotonic() - start < 0.5
    assert [d.queue for d in got] == ["a"]
    sa, sb = await broker.stats("a"), await broker.stats("b")
    assert (sa.pending, sa.in_flight, sb.pending, sb.in_flight) == (0, 1, 2, 0)
    rest = await broker.fetch(["b"], 5, block=0, consumer="c2")
    assert [d.envelope.args["i"] for d in rest if d.envelope] == [2, 3]


# -- hardening: namespaces, queue names, stored values, dead-letter cap, URL options ----


def test_a_namespace_with_a_colon_is_refused() -> None:
    # "p:t" + queue "q" and "p" + queue "t:q" would both live under "{p:t:q}".
    for bad in ("p:t", "{p}", "a b", "App"):
        with pytest.raises(ConfigurationError, match="namespace"):
            broker_from_url("redis://localhost:6379/0", namespace=bad)
        with pytest.raises(ConfigurationError, match="namespace"):
            backend_from_url("redis://localhost:6379/0", namespace=bad)


async def test_queue_names_are_escaped_inside_keys(
    broker: RedisBroker, raw: aioredis.Redis, namespace: str
) -> None:
    names = ["t:q", "t%3Aq", "a}b", "{a", "t"]
    assert broker.keys("t:q").dead == "{" + namespace + ":t%3Aq}:dead"
    assert broker.keys("t%3Aq").dead == "{" + namespace + ":t%253Aq}:dead"
    assert broker.keys("a}b").dead == "{" + namespace + ":a%7Db}:dead"
    for i, q in enumerate(names):
        await broker.publish([env(i, queue=q)])
    for i, q in enumerate(names):
        [d] = await broker.fetch([q], 10, block=0, consumer="c")
        assert d.envelope is not None and d.envelope.args == {"i": i} and d.queue == q
    # Every key of one queue is in one slot, named by the whole (escaped) queue name.
    for q in names:
        k = broker.keys(q)
        tag = k.dead[: k.dead.index("}") + 1]
        assert {key_slot(key.encode()) for key in k.keys} == {key_slot(tag.encode())}


async def test_stream_entries_with_odd_visibility_fields_are_all_delivered(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    assert await broker.fetch([Q], 1, block=0, consumer="c") == []  # groups exist
    # Entries as another program may have written them, first in line: a fractional,
    # negative, huge, NaN or non-numeric "v" used to make the fetch script fail (XCLAIM
    # IDLE takes integers only), for every entry of the queue, for good.
    odd = ["1.5", "-1e300", "1e300", "nan", "inf", "-inf", "-5", "soon", "99999999999999999999"]
    for i, v in enumerate(odd):
        await raw.xadd(broker.keys(Q).streams[9], {"p": env(i).to_json(), "v": v})
    await broker.publish([env(len(odd))])
    got = await broker.fetch([Q], 100, block=0, consumer="c")
    assert sorted(d.envelope.args["i"] for d in got if d.envelope) == list(range(len(odd) + 1))
    await broker.ack(got)
    assert (await broker.stats(Q)).in_flight == 0


async def test_publish_clamps_the_stored_lease_field(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    await broker.publish_raw(Q, env(visibility_timeout=60).to_json(), priority=42)
    [(_, fields)] = await raw.xrange(broker.keys(Q).streams[9])
    assert fields[b"v"] == b"60000"


async def test_the_dead_letter_stream_is_capped_and_drops_are_counted_and_logged(
    make_broker: object, raw: aioredis.Redis
) -> None:
    broker: RedisBroker = make_broker(dead_letter_max=10)  # type: ignore[operator]
    assert broker.dead_letter_max == 10
    total = 0
    with capture_stem_logs() as logs:
        for _ in range(3):
            await broker.publish([env(i) for i in range(150)])
            got = await broker.fetch([Q], 150, block=0, consumer="c")
            await broker.dead_letter([(d, "boom") for d in got])
            total += len(got)
    length = await raw.xlen(broker.keys(Q).dead)
    # Approximate trimming (MAXLEN ~) removes whole stream nodes: about the cap.
    assert 10 <= length <= 10 + 200
    trimmed = await broker.dead_letters_trimmed(Q)
    assert trimmed == total - length > 0
    assert (await broker.stats(Q)).dead == length
    events = [e for e in logs if e["event"] == "redis.broker.dead_letters_trimmed"]
    assert events and sum(e["trimmed"] for e in events) == trimmed
    assert all(e["queue"] == Q and e["dead_letter_max"] == 10 for e in events)


async def test_the_default_dead_letter_cap_is_generous(broker: RedisBroker) -> None:
    assert broker.dead_letter_max == 100_000
    await broker.publish([env(1)])
    [d] = await broker.fetch([Q], 1, block=0, consumer="c")
    await broker.dead_letter([(d, "x")])
    assert await broker.dead_letters_trimmed(Q) == 0


def test_dead_letter_max_from_the_url_or_the_constructor() -> None:
    b = broker_from_url("redis://localhost:6379/0?dead_letter_max=500")
    assert isinstance(b, RedisBroker) and b.dead_letter_max == 500
    settings = parse_redis_url("redis://localhost:6379/0")
    assert RedisBroker(settings, dead_letter_max=7).dead_letter_max == 7
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ConfigurationError, match="dead_letter_max"):
            RedisBroker(settings, dead_letter_max=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "query",
    [
        "dead_letter_max=0",
        "dead_letter_max=-5",
        "dead_letter_max=1.5",
        "dead_letter_max=lots",
        "dead_letter_max=",
        "claim_interval=nan",
        "block_time=inf",
        "result_ttl=0",
        "default_visibility_timeout=0",
        "default_visibility_timeout=1e13",
        "cluster=maybe",
        "ssl=perhaps",
        "bogus=1",  # unknown: would be accepted and ignored (or fail at connect)
        "claim_intervall=0.5",  # a typo
        "protocol=3",  # Stem speaks RESP2 itself
        "timeout=5",
        "ssl_ca_certs=/etc/ca.pem",  # a TLS option without TLS
        "sentinel_password=x",  # not a sentinel URL
        "block_time=1&block_time=2",
    ],
)
def test_unknown_query_keys_and_bad_values_are_refused(query: str) -> None:
    url = f"redis://localhost:6379/0?{query}"
    with pytest.raises(ConfigurationError):
        broker_from_url(url)
    with pytest.raises(ConfigurationError):
        backend_from_url(url)


def test_known_query_keys_are_accepted() -> None:
    url = ("redis://localhost:6379/0?dead_letter_max=5&claim_interval=0.5&block_time=2"
           "&default_visibility_timeout=60&result_ttl=10&cluster=0&socket_timeout=3"
           "&health_check_interval=10&max_connections=20&client_name=app&retry_on_timeout=1")
    assert isinstance(broker_from_url(url), RedisBroker)
    assert isinstance(backend_from_url(url), RedisBackend)
    assert isinstance(broker_from_url("redis://h:6379/0?ssl=1&ssl_ca_certs=/ca.pem"), RedisBroker)


def test_closing_a_store_closes_its_connections(redis_url: str, namespace: str) -> None:
    """No connection is left for the garbage collector (redis-py keeps a pool passed in
    explicitly open unless asked to close it)."""
    import subprocess
    import sys

    code = (
        "import asyncio, gc\n"
        "from stem.adapters import store_from_url\n"
        "async def main():\n"
        f"    st = store_from_url({redis_url!r}, namespace={namespace!r})\n"
        "    await st.ping()\n"
        "    await st.broker.stats('q')\n"
        "    await st.backend.get('x')\n"
        "    await st.close()\n"
        "asyncio.run(main())\n"
        "gc.collect()\n"
    )
    out = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "unclosed" not in out.stderr, out.stderr


# -- the lanes: hot commands on dedicated connections ------------------------------------


async def test_lane_script_loads_itself_on_noscript_and_survives_a_killed_connection(
        redis_url: str, namespace: str, raw: aioredis.Redis) -> None:
    from stem.adapters.redis._connection import RedisConnector, parse_redis_url

    conn = RedisConnector(parse_redis_url(redis_url))
    try:
        # A source no server has seen: the first EVALSHA meets NOSCRIPT and loads it.
        script = conn.script(f"-- {namespace}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
        key = f"{namespace}:lane"
        assert await script([key], [2]) == 2
        assert await script([key], [3]) == 5
        # The server drops the lane's connection: the next call reconnects and runs once.
        lane_id = await conn.lanes.call("CLIENT", "ID")
        assert await raw.execute_command("CLIENT", "KILL", "ID", lane_id) == 1
        assert await script([key], [1]) == 6
        assert int(await raw.get(key)) == 6
        # A command error is raised and leaves the connection usable.
        with pytest.raises(rexc.ResponseError):
            await conn.lanes.call("INCRBY", key, "not-a-number")
        assert await script([key], [1]) == 7
    finally:
        await conn.close()
    # Closing hands the lanes' connections back: nothing of ours stays connected.
    names = [c for c in (await raw.client_list()) if c.get("id") == str(lane_id)]
    assert names == []


def test_pack_command_is_byte_for_byte_redis_pys() -> None:
    from redis.asyncio.connection import Connection

    from stem.adapters.redis._connection import pack_command

    args = ["EVALSHA", "a" * 40, 3, b"k\x00ey", "clé", 1.5, -7, bytearray(b"ba"),
            b"x" * 70_000]
    assert pack_command(args) == b"".join(Connection().pack_command(*args))
    with pytest.raises(rexc.DataError):
        pack_command(["SET", "k", True])
