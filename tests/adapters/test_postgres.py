"""Postgres adapter behaviour beyond the conformance suite: migrations under
concurrency, LISTEN/NOTIFY wake-ups, lease tokens, transactional enqueue, recovery
from killed connections, and failing fast when the server is unreachable.

Every test works in its own schema (the ``namespace``), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from stem._time import utcnow
from stem.adapters import backend_from_url, broker_from_url
from stem.adapters._leasing import Claim
from stem.adapters.postgres import PostgresBroker, PostgresResultBackend, migrate, migrations
from stem.adapters.postgres import broker as pg_broker_module
from stem.adapters.postgres._pool import parse_url
from stem.envelope import Envelope
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.status import TaskState, TaskStatus
from tests.helpers import capture_stem_logs, eventually
from tests.services import pg_address, pg_via, pg_with_database

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]


def with_params(url: str, **params: str) -> str:
    """``url`` with query parameters added."""
    return url + ("&" if "?" in url else "?") + urlencode(params)


async def drop_schema(postgres_url: str, schema: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def app_name(namespace: str) -> str:
    """application_name of this test's connections, to find (and kill) them."""
    return f"stem-{namespace}"


@pytest.fixture
async def pg_url(postgres_url: str, namespace: str, app_name: str) -> AsyncIterator[str]:
    """A URL whose schema is this test's namespace; the schema is dropped afterwards."""
    yield with_params(postgres_url, schema=namespace, application_name=app_name)
    await drop_schema(postgres_url, namespace)


@pytest.fixture
async def broker(pg_url: str) -> AsyncIterator[PostgresBroker]:
    b = broker_from_url(pg_url)
    assert isinstance(b, PostgresBroker)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def producer(pg_url: str) -> AsyncIterator[PostgresBroker]:
    """A second broker (own pool and connections), as another process would have."""
    b = PostgresBroker(pg_url)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def backend(pg_url: str) -> AsyncIterator[PostgresResultBackend]:
    b = backend_from_url(pg_url)
    assert isinstance(b, PostgresResultBackend)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def raw_conn(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


def env(queue: str = "q", **kw: object) -> Envelope:
    return Envelope(name="t", queue=queue, **kw)  # type: ignore[arg-type]


async def idle(broker: PostgresBroker) -> bool:
    """True once a fetch of ``broker`` is asleep waiting for a wake-up."""
    return bool(broker._waiters)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- URLs and construction ------------------------------------------------------


def test_url_options_are_removed_from_the_dsn() -> None:
    s = parse_url(
        "postgres://u:secret@db.example:6543/app?schema=jobs&pool_size=3"
        "&connect_timeout=2.5&sslmode=disable"
    )
    assert s.schema == "jobs"
    assert s.pool_size == 3
    assert s.connect_timeout == 2.5
    assert s.dsn == "postgresql://u:secret@db.example:6543/app?sslmode=disable"
    assert "secret" not in s.display
    assert s.display == "db.example:6543/app (user u)"


def test_default_schema_and_bad_schema() -> None:
    assert parse_url("postgresql://localhost/db").schema == "stem"
    with pytest.raises(ConfigurationError, match="schema"):
        parse_url('postgresql://localhost/db?schema=x";drop')


def test_channel_names_fit_postgres_identifiers() -> None:
    long_schema = "s" * 63
    s = parse_url(f"postgresql://localhost/db?schema={long_schema}")
    assert len(s.channel("results")) <= 63
    assert s.channel("jobs") != s.channel("results")


async def test_unreachable_server_fails_fast_with_a_useful_message() -> None:
    port = free_port()
    broker = broker_from_url(f"postgresql://stem:hunter2@127.0.0.1:{port}/shop")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as info:
        await broker.ping()
    assert time.monotonic() - started < 3.0
    message = str(info.value)
    assert f"127.0.0.1:{port}/shop" in message
    assert "hunter2" not in message
    assert "check" in message
    # Other operations fail the same way (no retry loop before a first connect).
    with pytest.raises(ServiceUnavailableError):
        await broker.publish([env()])
    await broker.close()


async def test_unknown_database_says_so(postgres_url: str) -> None:
    broker = broker_from_url(pg_with_database(postgres_url, "stem_no_such_db_xyz"))
    with pytest.raises(ServiceUnavailableError,
                       match=r'database "stem_no_such_db_xyz" does not exist.*the database '
                             r"does not exist; create it or fix the database name"):
        await broker.ping()
    await broker.close()


# -- migrations -----------------------------------------------------------------

_CHILD = """
import asyncio, json, sys, time
from stem.adapters.postgres import broker_from_url, migrate
url, start, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start - time.time()))  # line the processes up
async def main():
    applied = []
    if mode == "migrate":
        applied = await migrate(url)
    b = broker_from_url(url)
    await b.ping()
    await b.close()
    print(json.dumps(applied))
asyncio.run(main())
"""


async def test_ten_processes_starting_at_once_migrate_exactly_once(
    pg_url: str, raw_conn: asyncpg.Connection, namespace: str
) -> None:
    start = time.time() + 2.0
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, pg_url, str(start),
            "migrate" if i % 2 else "ping",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for i in range(10)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    reported = [v for out, _ in results for v in json.loads(out)]
    assert len(reported) == len(set(reported))  # no version applied twice
    rows = await raw_conn.fetch(
        f'SELECT version, applied_by FROM "{namespace}".stem_migrations ORDER BY version'
    )
    assert [r["version"] for r in rows] == [m[0] for m in migrations.MIGRATIONS]
    # Running again is a no-op.
    assert await migrate(pg_url) == []


async def test_migrate_creates_the_schema(pg_url: str, raw_conn: asyncpg.Connection,
                                          namespace: str) -> None:
    assert await migrate(pg_url) == [m[0] for m in migrations.MIGRATIONS]
    tables = await raw_conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", namespace
    )
    assert {"stem_jobs", "stem_dead_letters", "stem_results", "stem_migrations"} <= {
        t["table_name"] for t in tables
    }


# -- LISTEN/NOTIFY wake-ups -----------------------------------------------------


async def test_idle_fetch_wakes_within_milliseconds_of_a_publish(
    broker: PostgresBroker, producer: PostgresBroker
) -> None:
    await producer.ping()
    latencies = []
    for _ in range(5):
        fetch = asyncio.create_task(broker.fetch(["q"], 10, block=5, consumer="w"))
        await eventually(lambda: idle(broker), timeout=5)
        await producer.publish([env()])
        published = time.perf_counter()
        got = await asyncio.wait_for(fetch, 5)
        latencies.append(time.perf_counter() - published)
        assert len(got) == 1
        await broker.ack(got)
    latencies.sort()
    assert latencies[2] < 0.05, latencies  # median
    assert latencies[-1] < 0.25, latencies


async def test_published_before_fetch_returns_at_once(
    broker: PostgresBroker, producer: PostgresBroker
) -> None:
    await broker.fetch(["q"], 1, block=0.01, consumer="w")  # listener up, queue watched
    await producer.publish([env()])
    started = time.monotonic()
    got = await broker.fetch(["q"], 1, block=5, consumer="w")
    assert len(got) == 1
    assert time.monotonic() - started < 0.5


async def test_notify_landing_between_look_and_sleep_is_not_lost(
    broker: PostgresBroker, producer: PostgresBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Take the timer out of the picture so only the NOTIFY can end the wait early.
    monkeypatch.setattr(broker._sql, "next_due", "SELECT NULL::float8 WHERE $1::text[] IS NULL")
    await producer.ping()
    real_claim = broker._claim
    calls = 0

    async def lease_then_publish(*args: object) -> Claim:
        nonlocal calls
        calls += 1
        got = await real_claim(*args)  # type: ignore[arg-type]
        if calls == 1:
            # The table looked empty; now a job arrives before fetch goes to sleep.
            assert got.deliveries == []
            generation = broker._generation
            await producer.publish([env()])

            async def notified() -> bool:
                return broker._generation != generation

            await eventually(notified, timeout=5)
        return got

    monkeypatch.setattr(broker, "_claim", lease_then_publish)
    started = time.monotonic()
    got = await broker.fetch(["q"], 1, block=5, consumer="w")
    assert len(got) == 1
    assert time.monotonic() - started < 1.0


async def test_notifications_for_other_queues_do_not_wake_a_fetch(
    broker: PostgresBroker, producer: PostgresBroker
) -> None:
    fetch = asyncio.create_task(broker.fetch(["mine"], 1, block=0.6, consumer="w"))
    await eventually(lambda: idle(broker), timeout=5)
    generation = broker._generation
    await producer.publish([env("other") for _ in range(3)])
    assert await asyncio.wait_for(fetch, 5) == []
    assert broker._generation == generation


async def test_delayed_job_wakes_an_idle_fetch_when_due(
    broker: PostgresBroker, producer: PostgresBroker
) -> None:
    await producer.ping()
    due = time.monotonic() + 0.6
    await producer.publish([env(not_before=utcnow() + timedelta(seconds=0.6))])
    got = await broker.fetch(["q"], 1, block=5, consumer="w")
    woke = time.monotonic()
    assert len(got) == 1
    assert due - 0.05 <= woke < due + 0.3


async def test_delayed_job_published_while_idle_moves_the_timer(
    broker: PostgresBroker, producer: PostgresBroker
) -> None:
    await producer.publish([env(not_before=utcnow() + timedelta(seconds=30))])
    fetch = asyncio.create_task(broker.fetch(["q"], 1, block=5, consumer="w"))
    await eventually(lambda: idle(broker), timeout=5)
    due = time.monotonic() + 0.4
    await producer.publish([env(not_before=utcnow() + timedelta(seconds=0.4))])
    got = await asyncio.wait_for(fetch, 5)
    assert len(got) == 1
    assert time.monotonic() < due + 0.3


# -- leases -----------------------------------------------------------------------


async def test_an_expiring_lease_wakes_an_idle_fetch(
    broker: PostgresBroker, producer: PostgresBroker
) -> None:
    # What a stale holder can and cannot do is in the conformance suite.
    await producer.publish([env(visibility_timeout=0.4)])
    [first] = await broker.fetch(["q"], 1, block=0, consumer="a")
    assert first.lease_expires_at is not None
    # Nobody announces an expiring lease: the idle fetch's timer must catch it.
    started = time.monotonic()
    [second] = await producer.fetch(["q"], 1, block=5, consumer="b")
    assert 0.3 < time.monotonic() - started < 1.0
    assert second.envelope.id == first.envelope.id  # type: ignore[union-attr]
    assert second.receipt != first.receipt
    assert not first.redelivered and second.redelivered


async def test_cancelled_fetch_gives_its_leases_back(broker: PostgresBroker) -> None:
    await broker.publish([env() for _ in range(3)])
    release = asyncio.Event()
    real_claim = broker._claim

    async def slow_claim(*args: object) -> Claim:
        got = await real_claim(*args)  # type: ignore[arg-type]
        await release.wait()  # cancelled caller, lease already taken
        return got

    broker._claim = slow_claim  # type: ignore[method-assign]
    fetch = asyncio.create_task(broker.fetch(["q"], 3, block=0, consumer="w"))

    async def leased() -> bool:
        return (await broker.stats("q")).in_flight == 3

    await eventually(leased, timeout=5)
    fetch.cancel()
    release.set()  # the UPDATE ends after the cancellation
    with pytest.raises(asyncio.CancelledError):
        await fetch
    # Given back before the cancelled fetch ended, not when the leases expire.
    assert (await broker.stats("q")).pending == 3


# -- publishing -------------------------------------------------------------------


async def test_bulk_publish_and_priority_order(broker: PostgresBroker) -> None:
    await broker.publish([env(args={"i": i}, priority=i % 3) for i in range(300)])
    assert (await broker.stats("q")).pending == 300
    got = await broker.fetch(["q"], 300, block=0, consumer="w")
    priorities = [d.envelope.priority for d in got]  # type: ignore[union-attr]
    assert priorities == sorted(priorities, reverse=True)
    # FIFO within a priority.
    twos = [d.envelope.args["i"] for d in got if d.envelope.priority == 2]  # type: ignore[union-attr]
    assert twos == sorted(twos)
    await broker.ack(got)
    assert (await broker.stats("q")).pending == 0


async def test_undecodable_bytes_are_delivered_for_dead_lettering(
    broker: PostgresBroker,
) -> None:
    await broker.publish_raw("q", b"\xff not json")
    [d] = await broker.fetch(["q"], 1, block=0, consumer="w")
    assert d.envelope is None and d.decode_error
    assert d.raw == b"\xff not json"
    await broker.dead_letter([(d, d.decode_error)])
    [dead] = await broker.dead_letters("q")
    assert dead.raw == b"\xff not json" and dead.envelope is None and dead.id
    # Replaying skips what can't be decoded; it stays dead-lettered.
    good = env()
    await broker.publish([good])
    [d] = await broker.fetch(["q"], 1, block=0, consumer="w")
    await broker.dead_letter([(d, "bad luck")])
    assert await broker.replay_dead_letters("q") == 1
    assert [dl.raw for dl in await broker.dead_letters("q")] == [b"\xff not json"]
    [again] = await broker.fetch(["q"], 1, block=0, consumer="w")
    assert again.envelope is not None and again.envelope.id == good.id


async def test_transactional_enqueue_commits_or_rolls_back_with_the_caller(
    broker: PostgresBroker, pg_url: str
) -> None:
    conn = await asyncpg.connect(parse_url(pg_url).dsn)
    try:
        committed, rolled_back = env(args={"n": 1}), env(args={"n": 2})
        async with conn.transaction():
            await broker.publish_with_connection(conn, [committed])
            # Not visible to anyone before the commit.
            assert await broker.fetch(["q"], 10, block=0, consumer="w") == []
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await broker.publish_with_connection(conn, [rolled_back, env()])
                raise RuntimeError("caller's transaction fails")
    finally:
        await conn.close()
    got = await broker.fetch(["q"], 10, block=0, consumer="w")
    assert [d.envelope.id for d in got] == [committed.id]  # type: ignore[union-attr]


async def test_transactional_enqueue_wakes_idle_fetch_at_commit(
    broker: PostgresBroker, producer: PostgresBroker, pg_url: str
) -> None:
    conn = await asyncpg.connect(parse_url(pg_url).dsn)
    try:
        await producer.ping()
        fetch = asyncio.create_task(broker.fetch(["q"], 1, block=5, consumer="w"))
        await eventually(lambda: idle(broker), timeout=5)
        async with conn.transaction():
            await producer.publish_with_connection(conn, [env()])
        committed = time.perf_counter()
        got = await asyncio.wait_for(fetch, 5)
        assert len(got) == 1
        assert time.perf_counter() - committed < 0.25
    finally:
        await conn.close()


async def test_publish_with_connection_rejects_other_objects(broker: PostgresBroker) -> None:
    with pytest.raises(TypeError, match="asyncpg"):
        await broker.publish_with_connection(object(), [env()])


# -- recovery -------------------------------------------------------------------------


async def kill_connections(raw_conn: asyncpg.Connection, app_name: str) -> int:
    killed = await raw_conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = $1 AND pid <> pg_backend_pid()",
        app_name,
    )
    return int(killed)


async def test_recovers_after_its_connections_are_terminated(
    broker: PostgresBroker,
    producer: PostgresBroker,
    raw_conn: asyncpg.Connection,
    app_name: str,
) -> None:
    await broker.fetch(["q"], 1, block=0.01, consumer="w")  # pool + LISTEN connection
    await producer.ping()
    assert await kill_connections(raw_conn, app_name) >= 3

    # Pooled connections come back by themselves.
    await broker.publish([env()])
    assert len(await broker.fetch(["q"], 1, block=0, consumer="w")) == 1

    # So does LISTEN: an idle fetch is woken by NOTIFY again, not by a fallback poll.
    fetch = asyncio.create_task(broker.fetch(["q"], 5, block=5, consumer="w"))
    await eventually(lambda: idle(broker), timeout=5)
    await eventually(lambda: _listening(broker), timeout=5)
    await producer.publish([env()])
    published = time.perf_counter()
    assert len(await asyncio.wait_for(fetch, 5)) == 1
    assert time.perf_counter() - published < 0.25


async def test_idle_fetch_survives_its_listener_being_killed(
    broker: PostgresBroker,
    producer: PostgresBroker,
    raw_conn: asyncpg.Connection,
    app_name: str,
) -> None:
    await producer.ping()
    fetch = asyncio.create_task(broker.fetch(["q"], 5, block=8, consumer="w"))
    await eventually(lambda: idle(broker), timeout=5)
    await kill_connections(raw_conn, app_name)
    # The fetch re-establishes LISTEN and goes back to sleep.
    await eventually(lambda: _listening(broker), timeout=5)
    await eventually(lambda: idle(broker), timeout=5)
    await producer.publish([env()])
    published = time.perf_counter()
    assert len(await asyncio.wait_for(fetch, 8)) == 1
    assert time.perf_counter() - published < 0.25


async def test_an_operation_cancelled_mid_query_leaves_the_store_usable(
    producer: PostgresBroker, raw_conn: asyncpg.Connection, app_name: str
) -> None:
    """The connection kept between operations goes back to the pool when an operation on
    it is cut off (the pool cancels the query); the next operations run at once."""
    await producer.ping()  # connected: one connection is kept for the next operation
    sleeper = asyncio.create_task(producer._db.run(lambda c: c.execute("SELECT pg_sleep(30)")))

    async def sleeping() -> bool:
        n = await raw_conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND query LIKE 'SELECT pg_sleep%' AND state = 'active'", app_name)
        return bool(n)

    await eventually(sleeping, timeout=5)
    sleeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeper
    started = time.perf_counter()
    for _ in range(3):
        await producer.publish([env()])
    assert time.perf_counter() - started < 5
    await eventually(lambda: _not(sleeping), timeout=5)  # the server stopped that query
    assert (await producer.stats("q")).pending == 3


async def test_a_connection_lost_mid_operation_is_retried_only_where_allowed(
    producer: PostgresBroker, raw_conn: asyncpg.Connection, app_name: str
) -> None:
    """Cut off while it runs on the kept connection, an operation runs again through the
    pool when it may be retried, and is an outage error when it may not (a fetch)."""
    calls = 0

    async def op(conn: asyncpg.Connection) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await conn.execute("SELECT pg_sleep(30)")
        return calls

    async def sleeping() -> bool:
        return bool(await raw_conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND query LIKE 'SELECT pg_sleep%' AND state = 'active'", app_name))

    for retry, outcome in ((False, ServiceUnavailableError), (True, 2)):
        await producer.ping()  # a kept connection
        calls = 0
        task = asyncio.create_task(producer._db.run(op, retry=retry))
        await eventually(sleeping, timeout=5)
        await kill_connections(raw_conn, app_name)
        if retry:
            assert await asyncio.wait_for(task, 10) == outcome
        else:
            with pytest.raises(ServiceUnavailableError):
                await asyncio.wait_for(task, 10)
            assert calls == 1


async def test_an_error_inside_a_transaction_leaves_no_transaction_open(
    producer: PostgresBroker,
) -> None:
    async def fails_in_transaction(conn: asyncpg.Connection) -> None:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
        raise RuntimeError("boom")

    await producer.ping()
    with pytest.raises(RuntimeError, match="boom"):
        await producer._db.run(fails_in_transaction)
    async def in_transaction(conn: asyncpg.Connection) -> bool:
        return conn.is_in_transaction()

    for _ in range(3):  # whichever connection serves these is not inside a transaction
        assert not await producer._db.run(in_transaction)


async def _not(check: Any) -> bool:
    return not await check()


async def _listening(broker: PostgresBroker) -> bool:
    return broker._listener.active


# -- result backend ------------------------------------------------------------------


async def test_wait_is_woken_by_the_terminal_write(
    backend: PostgresResultBackend, pg_url: str
) -> None:
    writer = PostgresResultBackend(pg_url)
    try:
        await writer.set_many([(TaskStatus(id="t1", state=TaskState.RUNNING), None)])
        waiting = asyncio.create_task(backend.wait("t1", 5))
        await eventually(lambda: _has_waiter(backend, "t1"), timeout=5)
        await writer.set_many([(TaskStatus(id="t1", state=TaskState.SUCCEEDED, payload=7), None)])
        written = time.perf_counter()
        status = await asyncio.wait_for(waiting, 5)
        assert status is not None and status.payload == 7
        assert time.perf_counter() - written < 0.25
    finally:
        await writer.close()


async def _has_waiter(backend: PostgresResultBackend, task_id: str) -> bool:
    return task_id in backend._waiters.ids() and backend._listener.active


async def test_wait_times_out_with_none(backend: PostgresResultBackend) -> None:
    started = time.monotonic()
    assert await backend.wait("missing", 0.3) is None
    assert 0.25 < time.monotonic() - started < 1.0


async def test_last_status_in_a_batch_wins(backend: PostgresResultBackend) -> None:
    await backend.set_many(
        [
            (TaskStatus(id="a", state=TaskState.RUNNING), None),
            (TaskStatus(id="a", state=TaskState.SUCCEEDED, payload=1), None),
            (TaskStatus(id="b", state=TaskState.FAILED), None),
        ]
    )
    got = await backend.get_many(["a", "b", "c"])
    assert got["a"].state is TaskState.SUCCEEDED and got["b"].state is TaskState.FAILED
    assert "c" not in got


async def test_expired_results_are_hidden_then_purged(
    backend: PostgresResultBackend, raw_conn: asyncpg.Connection, namespace: str
) -> None:
    await backend.set_many(
        [
            (TaskStatus(id="short", state=TaskState.SUCCEEDED), 0.2),
            (TaskStatus(id="long", state=TaskState.SUCCEEDED), 60),
        ]
    )

    async def expired() -> bool:
        return await backend.get("short") is None

    await eventually(expired, timeout=5)
    assert set(await backend.get_many(["short", "long"])) == {"long"}
    assert await backend.purge_expired() == 1
    assert await raw_conn.fetchval(f'SELECT count(*) FROM "{namespace}".stem_results') == 1


async def test_older_schema_is_upgraded_on_connect(
    pg_url: str, raw_conn: asyncpg.Connection, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
        m.setattr(migrations, "LATEST", 1)
        assert await migrate(pg_url) == [1]
    broker = PostgresBroker(pg_url)
    try:
        await broker.publish([env()])
        [d] = await broker.fetch(["q"], 1, block=0, consumer="w")
        assert not d.redelivered
    finally:
        await broker.close()
    versions = await raw_conn.fetch(f'SELECT version FROM "{namespace}".stem_migrations')
    assert sorted(v["version"] for v in versions) == [m[0] for m in migrations.MIGRATIONS]


# -- through the app and a worker ------------------------------------------------------


async def test_app_and_worker_on_postgres_with_transactional_enqueue(pg_url: str) -> None:
    import stem
    from tests.helpers import running_worker

    app = stem.Stem("pg", broker=pg_url, backend=pg_url)

    @app.task(name="pg.add")
    async def add(x: int, y: int) -> int:
        return x + y

    conn = await asyncpg.connect(parse_url(pg_url).dsn)
    try:
        async with running_worker(app):
            ids = [await app.enqueue("pg.add", i, 1) for i in range(20)]
            async with conn.transaction():
                in_tx = await app.enqueue("pg.add", 100, 1, connection=conn)
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    dropped = await app.enqueue("pg.add", 200, 1, connection=conn)
                    raise RuntimeError("rollback")
            results = [await app.wait(i, timeout=10) for i in [*ids, in_tx]]
            assert [r.value for r in results] == [*(i + 1 for i in range(20)), 101]
            assert await app.get_result(dropped) is None
    finally:
        await conn.close()
        await app.close()


# -- outages: a proxy between the adapters and the server stands in for a restart ----------


class FlakyProxy:
    """TCP proxy to the test server that can drop every connection and refuse new ones
    (what clients see while Postgres restarts), then come back on the same port.
    ``target`` is ``(host, port)``, or a Unix socket path (the embedded server's)."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._pipes):
            w.transport.abort()
        self._pipes.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_reconnects_after_an_outage_and_logs_it_once(
    postgres_url: str, namespace: str
) -> None:
    proxy = FlakyProxy(pg_address(postgres_url))
    await proxy.up()
    via_proxy = with_params(pg_via(postgres_url, "127.0.0.1", proxy.port), schema=namespace)
    broker, producer = PostgresBroker(via_proxy), PostgresBroker(with_params(postgres_url,
                                                                              schema=namespace))
    try:
        await broker.fetch(["q"], 1, block=0.01, consumer="w")  # pool + LISTEN up
        with capture_stem_logs() as logs:
            await proxy.down()
            publishing = asyncio.create_task(broker.publish([env(args={"n": 1})]))

            async def retrying() -> bool:
                return any(e["event"] == "postgres.connection_lost" for e in logs)

            await eventually(retrying, timeout=5)
            assert not publishing.done()  # held back and retried, not failed
            await asyncio.sleep(0.5)  # stay down for a while: backoff, not one retry
            await proxy.up()
            await asyncio.wait_for(publishing, 10)
        events = [e["event"] for e in logs if e.get("role") == "broker"]
        assert events.count("postgres.connection_lost") == 1
        assert events.count("postgres.connection_restored") == 1

        assert len(await broker.fetch(["q"], 1, block=0, consumer="w")) == 1
        # LISTEN is back too: an idle fetch is woken by a publish from elsewhere.
        fetch = asyncio.create_task(broker.fetch(["q"], 1, block=5, consumer="w"))
        await eventually(lambda: idle(broker), timeout=5)
        await eventually(lambda: _listening(broker), timeout=5)
        await producer.publish([env()])
        published = time.perf_counter()
        assert len(await asyncio.wait_for(fetch, 5)) == 1
        assert time.perf_counter() - published < 0.25
    finally:
        await broker.close()
        await producer.close()
        await proxy.down()
        await drop_schema(postgres_url, namespace)


async def test_broker_vacuums_its_jobs_table_after_enough_churn(postgres_url: str,
                                                                namespace: str) -> None:
    import asyncpg

    from stem.adapters.postgres import broker as pg_broker
    from stem.envelope import Envelope
    from tests.helpers import eventually

    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}"
    b = pg_broker.PostgresBroker(url, namespace=namespace)
    conn = await asyncpg.connect(postgres_url)
    try:
        old = pg_broker.VACUUM_EVERY
        pg_broker.VACUUM_EVERY = 200
        try:
            await b.publish([Envelope(name="t", args={"i": i}) for i in range(150)])
            got = await b.fetch(["default"], 150, block=1, consumer="c")
            await b.ack(got)  # 300 rows touched: past the threshold
        finally:
            pg_broker.VACUUM_EVERY = old

        async def vacuumed() -> bool:
            row = await conn.fetchrow(
                "SELECT vacuum_count FROM pg_stat_user_tables "
                "WHERE schemaname = $1 AND relname = 'stem_jobs'", namespace)
            return row is not None and row["vacuum_count"] >= 1

        await eventually(vacuumed, timeout=10, interval=0.1)
    finally:
        await b.close()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        await conn.close()


async def test_large_batches_go_by_copy_ready_and_delayed(postgres_url: str,
                                                          namespace: str) -> None:
    from datetime import timedelta

    from stem._time import utcnow
    from stem.adapters.postgres import broker as pg_broker
    from stem.envelope import Envelope

    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}"
    b = pg_broker.PostgresBroker(url, namespace=namespace)
    try:
        n = pg_broker.COPY_MIN_BATCH * 2
        ready = [Envelope(name="t", args={"i": i}, priority=i % 10) for i in range(n)]
        later = [Envelope(name="t", args={"i": -1},
                          not_before=utcnow() + timedelta(seconds=30))]
        await b.publish(ready + later)
        stats = await b.stats("default")
        assert (stats.pending, stats.delayed) == (n, 1)
        got = await b.fetch(["default"], n + 1, block=1, consumer="c")
        assert sorted(d.envelope.args["i"] for d in got) == list(range(n))  # type: ignore[union-attr]
        assert got[0].envelope is not None and got[0].envelope.priority == 9
    finally:
        await b.close()
        from tests.services import drop_pg_schema

        await drop_pg_schema(postgres_url, namespace)


async def test_transactional_bulk_enqueue_by_copy_commits_or_rolls_back(
        postgres_url: str, namespace: str) -> None:
    import asyncpg

    import stem
    from tests.services import drop_pg_schema

    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}"
    app = stem.Stem("p", broker=url, backend=url, namespace=namespace)
    conn = await asyncpg.connect(postgres_url)
    try:
        d = app.definition("t")
        seen = []
        for outcome in ("rollback", "commit"):
            tr = conn.transaction()
            await tr.start()
            await app.enqueue_many([d.call() for _ in range(100)], connection=conn)
            await (tr.rollback() if outcome == "rollback" else tr.commit())
            seen.append((await app.broker.stats("default")).pending)
        assert seen == [0, 100]
    finally:
        await app.close()
        await conn.close()
        await drop_pg_schema(postgres_url, namespace)


# -- hardening: namespaces, stored values, dead-letter ids ---------------------------


def test_the_namespace_is_the_schema_verbatim() -> None:
    # The old sanitising mapped all four to one schema, "a_b".
    assert parse_url("postgresql://localhost/db", "a-b").schema == "a-b"
    assert parse_url("postgresql://localhost/db", "a_b").schema == "a_b"
    for bad in ("a.b", "a b", "A_b", "x" * 64, "pg_catalog"):
        with pytest.raises(ConfigurationError, match="namespace"):
            parse_url("postgresql://localhost/db", bad)
    # A long namespace still gets its own NOTIFY channels within the 63-byte limit.
    s = parse_url("postgresql://localhost/db", "n" * 63)
    assert len(s.channel("jobs").encode()) <= 63
    assert s.channel("jobs") != parse_url("postgresql://localhost/db", "n" * 62).channel("jobs")


@pytest.mark.parametrize(
    "query", ["schema=", "pool_size=", "connect_timeout=nan", "connect_timeout=inf",
              "pool_size=0", "connect_timeout=-1"],
)
def test_bad_stem_option_values_are_refused(query: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_url(f"postgresql://localhost/db?{query}")


async def test_a_row_with_vt_1e13_does_not_block_the_queue(
    broker: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str
) -> None:
    await broker.ping()  # schema and tables exist
    # Rows as another program (or an older Stem) wrote them, first in line: without a
    # bound, now() + 1e13 s overflows and the whole lease statement fails, for good.
    odd = [1e13, 1e300, float("inf"), float("-inf"), float("nan"), -5.0, 0.0]
    for i, vt in enumerate(odd):
        await raw_conn.execute(
            f'INSERT INTO "{namespace}".stem_jobs (queue, priority, visibility, envelope) '
            "VALUES ('q', 9, $1, $2)",
            vt,
            env(args={"i": i}).to_json(),
        )
    await broker.publish([env(args={"i": len(odd)})])
    got = await broker.fetch(["q"], 100, block=0, consumer="w")
    assert sorted(d.envelope.args["i"] for d in got if d.envelope) == list(range(len(odd) + 1))
    now = time.time()
    for d in got:
        assert d.lease_expires_at is not None
        assert now - 5 < d.lease_expires_at <= now + 7 * 86_400 + 5


async def test_publish_raw_clamps_the_stored_columns(
    broker: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str
) -> None:
    raw = env(visibility_timeout=60).to_json()
    await broker.publish_raw("q", raw, priority=40_000)  # beyond smallint: refused before
    await broker.publish([env(priority=42)])
    rows = await raw_conn.fetch(
        f'SELECT priority, visibility, envelope FROM "{namespace}".stem_jobs ORDER BY id')
    assert [(r["priority"], r["visibility"]) for r in rows] == [(9, 60.0), (9, None)]
    assert bytes(rows[0]["envelope"]) == raw


async def test_dead_letters_written_without_task_id_are_listed_by_envelope_id(
    broker: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str
) -> None:
    await broker.ping()
    e = env()
    await raw_conn.execute(
        f'INSERT INTO "{namespace}".stem_dead_letters (queue, reason, envelope) '
        "VALUES ('q', 'imported', $1), ('q', 'junk', $2), ('q', 'half', $3)",
        e.to_json(),
        b"not json",
        b'{"id": "readable-id", "name": ""}',
    )
    ids = [dl.id for dl in await broker.dead_letters("q")]
    assert ids[0] == e.id
    assert ids[1].startswith("dead-letter-")
    assert ids[2] == "readable-id"


async def test_a_stale_row_count_is_refreshed_so_the_fetch_plan_walks_the_index(
        broker: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # This test checks the row count itself: no automatic check after publishing.
    monkeypatch.setattr(pg_broker_module, "PUBLISHED_CHECK_ROWS", 10**9)
    # The state a drained queue leaves when autovacuum is off: a vacuumed, empty table
    # whose planner row count (0) no longer matches the backlog that arrives next.
    table = f'"{namespace}".stem_jobs'
    await broker.publish([Envelope(name="t", queue="q")])
    await raw_conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    await raw_conn.execute(f"DELETE FROM {table}")
    await raw_conn.execute(f"VACUUM {table}")
    for _ in range(5):
        await broker.publish([Envelope(name="t", queue="q") for _ in range(1000)])
    sql = broker._sql.fetch_one_queue
    args = ("q", 400, 30.0, "w", uuid.uuid4())

    async def plan() -> str:
        return "\n".join(r[0] for r in await raw_conn.fetch("EXPLAIN " + sql, *args))

    assert await raw_conn.fetchval(
        f"SELECT reltuples FROM pg_class WHERE oid = '{table}'::regclass") == 0

    async def live_counted() -> bool:  # the stats system reports inserts asynchronously
        return bool(await raw_conn.fetchval(
            f"SELECT n_live_tup > 4000 FROM pg_stat_user_tables WHERE relid = '{table}'::regclass"))

    await eventually(live_counted, timeout=10)
    # With reltuples 0 the planner usually sorts the whole backlog (the slow plan), but
    # it may also guess from the table's pages: only the plan after the refresh is ours.
    assert await broker.refresh_stats() is True
    assert await raw_conn.fetchval(
        f"SELECT reltuples FROM pg_class WHERE oid = '{table}'::regclass") > 4000
    assert "Sort" not in (await plan()).split("CTE upd")[0]  # no sort of the backlog
    assert await broker.refresh_stats() is False  # fresh now: nothing to do


async def _emptied_without_stats(raw_conn: asyncpg.Connection, table: str) -> None:
    """What a drained queue leaves when autovacuum is off: an empty, vacuumed table whose
    planner row count (0) will not match the next backlog."""
    await raw_conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    await raw_conn.execute(f"DELETE FROM {table}")
    await raw_conn.execute(f"VACUUM {table}")
    assert await _reltuples(raw_conn, table) == 0


async def _reltuples(raw_conn: asyncpg.Connection, table: str) -> float:
    return float(await raw_conn.fetchval(
        f"SELECT reltuples FROM pg_class WHERE oid = '{table}'::regclass"))


async def test_a_bulk_publish_gets_the_row_count_right_before_any_fetch(
        producer: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str) -> None:
    table = f'"{namespace}".stem_jobs'
    await producer.publish([env()])  # migrates
    await _emptied_without_stats(raw_conn, table)
    for _ in range(5):
        await producer.publish([env() for _ in range(1000)])

    async def counted() -> bool:
        return await _reltuples(raw_conn, table) > 2000

    # The producer checked (and analyzed) in the background: no fetch has run yet.
    await eventually(counted, timeout=10)
    plan = "\n".join(r[0] for r in await raw_conn.fetch(
        "EXPLAIN " + producer._sql.fetch_one_queue, "q", 400, 30.0, "w", uuid.uuid4()))
    assert "Sort" not in plan.split("CTE upd")[0]  # the fetch index, not a sort


async def test_the_first_fetch_checks_the_row_count_before_it_runs(
        broker: PostgresBroker, producer: PostgresBroker, raw_conn: asyncpg.Connection,
        namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A backlog written by a producer that does not check (an older one, or SQL).
    monkeypatch.setattr(pg_broker_module, "PUBLISHED_CHECK_ROWS", 10**9)
    table = f'"{namespace}".stem_jobs'
    await producer.publish([env()])
    await _emptied_without_stats(raw_conn, table)
    for _ in range(5):
        await producer.publish([env() for _ in range(1000)])
    assert await _reltuples(raw_conn, table) == 0
    got = await broker.fetch(["q"], 10, block=0, consumer="w")
    assert len(got) == 10
    assert await _reltuples(raw_conn, table) > 4000  # analyzed before that fetch ran


async def test_a_fetch_finding_the_queue_drained_vacuums_the_table_small(
        broker: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str) -> None:
    # Fewer rows than VACUUM_EVERY: only the idle fetch's vacuum can reclaim them,
    # once everything this broker leased is settled.
    from stem.adapters.postgres import broker as pg_broker

    assert 3000 < pg_broker.VACUUM_EVERY
    table = f'"{namespace}".stem_jobs'
    await broker.ping()  # migrates
    await raw_conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    await broker.publish([env() for _ in range(1500)])
    got = await broker.fetch(["q"], 1500, block=1, consumer="w")
    assert len(got) == 1500
    await broker.ack(got[:1400])
    assert await raw_conn.fetchval(f"SELECT pg_relation_size('{table}'::regclass)") > 0
    # Nothing left to fetch but 100 still leased: the drain's tail, not yet drained.
    assert await broker.fetch(["q"], 10, block=0, consumer="w") == []
    await asyncio.sleep(0.3)
    assert await raw_conn.fetchval(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = $1::regclass", table) == 0
    await broker.ack(got[1400:])
    assert await broker.fetch(["q"], 10, block=0, consumer="w") == []

    # (How small it gets depends on the server: another session's old snapshot keeps
    # dead rows, and their pages, from being reclaimed.)
    async def vacuumed() -> bool:
        return bool(await raw_conn.fetchval(
            "SELECT vacuum_count >= 1 FROM pg_stat_user_tables WHERE relid = $1::regclass",
            table))

    await eventually(vacuumed, timeout=10, interval=0.1)


async def test_a_backlog_the_statistics_views_have_not_counted_yet_is_analyzed_too(
        broker: PostgresBroker, raw_conn: asyncpg.Connection, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # This test checks the row count itself: no automatic check after publishing.
    monkeypatch.setattr(pg_broker_module, "PUBLISHED_CHECK_ROWS", 10**9)
    # What a drained queue leaves: the rows gone, the pages still there, reltuples 0
    # (the planner then expects no row at all: the lease UPDATE walked the fetch
    # index for its ids). The next backlog reaches n_live_tup only when its producer's
    # session reports it, seconds later; the broker counts what it fetches from.
    table = f'"{namespace}".stem_jobs'
    await broker.publish([env() for _ in range(2000)])
    await raw_conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    await raw_conn.execute(f"DELETE FROM {table}")
    await raw_conn.execute(f"ANALYZE {table}")
    assert await broker.fetch(["q"], 10, block=0, consumer="w") == []
    assert await broker.refresh_stats() is False  # empty: nothing to do
    for _ in range(5):
        await broker.publish([env() for _ in range(1000)])
    # Not reported yet, as far as the statistics views can tell.
    await raw_conn.execute(f"SELECT pg_stat_reset_single_table_counters('{table}'::regclass)")
    assert await raw_conn.fetchval(
        f"SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = '{table}'::regclass") == 0
    assert await raw_conn.fetchval(
        f"SELECT reltuples FROM pg_class WHERE oid = '{table}'::regclass") == 0
    sql = broker._sql.fetch_one_queue
    args = ("q", 400, 30.0, "w", uuid.uuid4())

    async def plan() -> str:
        return "\n".join(r[0] for r in await raw_conn.fetch("EXPLAIN " + sql, *args))

    assert "stem_jobs_pkey" not in (await plan()).split("CTE upd")[1]  # the slow plan
    assert await broker.refresh_stats() is True
    assert await raw_conn.fetchval(
        f"SELECT reltuples FROM pg_class WHERE oid = '{table}'::regclass") > 4000
    picked, lease = (await plan()).split("CTE upd")
    assert "Sort" not in picked  # the fetch index, not a sort of the backlog
    assert "stem_jobs_pkey" in lease  # leased through the primary key
    assert await broker.refresh_stats() is False  # fresh now
