"""SQLite adapter specifics: files, several connections and processes, locking."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from stem.adapters import backend_from_url, broker_from_url
from stem.adapters.sqlite import SqliteBackend, SqliteBroker, _db
from stem.adapters.sqlite import backend as backend_mod
from stem.adapters.sqlite import broker as broker_mod
from stem.envelope import Envelope
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.status import TaskState, TaskStatus
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


def url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "stem.db"


@pytest.fixture
async def adapters(db: Path) -> Iterator[list[SqliteBroker | SqliteBackend]]:
    """Adapters a test opens (appended by it), closed afterwards."""
    opened: list[SqliteBroker | SqliteBackend] = []
    yield opened  # type: ignore[misc]
    for a in opened:
        await a.close()


def open_broker(
    adapters: list[SqliteBroker | SqliteBackend], path: Path, **kw: str
) -> SqliteBroker:
    b = broker_from_url(url(path), **kw)
    assert isinstance(b, SqliteBroker)
    adapters.append(b)
    return b


def open_backend(adapters: list[SqliteBroker | SqliteBackend], path: Path) -> SqliteBackend:
    b = backend_from_url(url(path))
    assert isinstance(b, SqliteBackend)
    adapters.append(b)
    return b


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# -- URLs and files ---------------------------------------------------------------


def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _db.path_from_url("sqlite:///.stem/stem.db") == str(tmp_path / ".stem" / "stem.db")
    assert _db.path_from_url("sqlite:////var/data/x.db") == "/var/data/x.db"
    assert _db.path_from_url("sqlite:///dir%20with%20space/x.db") == str(
        tmp_path / "dir with space" / "x.db"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "sqlite://host/x.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        # The adapter takes no options: one would be accepted and ignored.
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db?timeout=5",
        "sqlite:///x.db#frag",
    ],
)
def test_bad_urls_are_configuration_errors(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        broker_from_url(bad)


async def test_nothing_is_opened_until_used_then_dirs_and_tables_exist(
    tmp_path: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    path = tmp_path / "a" / "b" / "stem.db"
    broker = open_broker(adapters, path)
    backend = open_backend(adapters, path)
    assert not path.parent.exists()
    await broker.ping()
    await backend.ping()
    assert {"stem_jobs", "stem_dead_letters", "stem_results", "stem_schema_version"} <= tables(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = dict(conn.execute("SELECT name, version FROM stem_schema_version").fetchall())
    assert versions == {"stem_jobs": 1, "stem_results": 1}


async def test_namespace_prefixes_tables(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    one = open_broker(adapters, db, namespace="app-one")
    two = open_broker(adapters, db, namespace="two")
    under = open_broker(adapters, db, namespace="app_one")
    await one.publish([Envelope(name="t")])
    assert (await two.stats("default")).pending == 0
    assert (await under.stats("default")).pending == 0
    assert (await one.stats("default")).pending == 1
    # The namespace is the prefix verbatim: "app-one" and "app_one" never share tables.
    assert {"app-one_jobs", "app_one_jobs", "two_jobs"} <= tables(db)


async def test_broker_and_backend_share_one_file(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    broker, backend = open_broker(adapters, db), open_backend(adapters, db)
    e = Envelope(name="t")
    await broker.publish([e])
    [d] = await broker.fetch(["default"], 1, block=0, consumer="w")
    await backend.set_many([(TaskStatus(id=e.id, state=TaskState.SUCCEEDED, payload=1), None)])
    await broker.ack([d])
    assert (await backend.get(e.id)) is not None
    assert (await broker.stats("default")).in_flight == 0


async def test_unusable_file_raises_service_unavailable(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    broker = broker_from_url(url(not_a_dir / "stem.db"))
    with pytest.raises(ServiceUnavailableError, match=r"stem\.db"):
        await broker.ping()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    backend = backend_from_url(url(corrupt))
    with pytest.raises(ServiceUnavailableError, match=r"corrupt\.db"):
        await backend.ping()
    await broker.close()
    await backend.close()


async def test_adapter_reopens_after_close(db: Path) -> None:
    broker = broker_from_url(url(db))
    await broker.publish([Envelope(name="t")])
    await broker.close()
    assert (await broker.stats("default")).pending == 1
    await broker.close()


# -- several connections on one file ------------------------------------------------


async def test_two_brokers_on_one_file_never_lease_the_same_envelope(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    first, second = open_broker(adapters, db), open_broker(adapters, db)
    await second.ping()
    envelopes = [Envelope(name="t", args={"i": i}) for i in range(500)]
    await first.publish(envelopes)

    async def consume(broker: SqliteBroker, name: str) -> list[str]:
        ids: list[str] = []
        while batch := await broker.fetch(["default"], 7, block=0.05, consumer=name):
            ids.extend(d.envelope.id for d in batch if d.envelope)
            # Stands in for running the tasks; without it one connection can take the
            # write lock back-to-back and the other never gets a turn.
            await asyncio.sleep(0.002)
        return ids

    results = await asyncio.gather(
        consume(first, "a1"), consume(first, "a2"), consume(second, "b1"), consume(second, "b2")
    )
    from_first = results[0] + results[1]
    from_second = results[2] + results[3]
    assert from_first and from_second  # both connections really competed
    assert set(from_first).isdisjoint(from_second)
    everything = from_first + from_second
    assert len(everything) == len(set(everything)) == 500
    assert set(everything) == {e.id for e in envelopes}


async def test_publish_wakes_a_fetch_on_another_instance_in_this_process(
    db: Path, adapters: list[SqliteBroker | SqliteBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With polling made useless, only the in-process wake-up can end the fetch early.
    monkeypatch.setattr(broker_mod, "FETCH_POLL_INTERVAL", 30.0)
    consumer, producer = open_broker(adapters, db), open_broker(adapters, db)
    await consumer.ping()
    published_at: list[float] = []

    async def publish_later() -> None:
        await asyncio.sleep(0.2)  # the fetch must be blocked by then: that's the case under test
        published_at.append(time.monotonic())
        await producer.publish([Envelope(name="t")])

    task = asyncio.create_task(publish_later())
    got = await consumer.fetch(["default"], 1, block=10, consumer="c")
    returned = time.monotonic()
    await task
    assert len(got) == 1
    assert returned - published_at[0] < 0.5


async def test_result_wakes_wait_on_another_instance_in_this_process(
    db: Path, adapters: list[SqliteBroker | SqliteBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_mod, "WAIT_POLL_INTERVAL", 30.0)
    reader, writer = open_backend(adapters, db), open_backend(adapters, db)
    waiter = asyncio.create_task(reader.wait("t", timeout=10))
    await asyncio.sleep(0.1)  # the wait must be waiting by then: that's the case under test
    written_at = time.monotonic()
    await writer.set_many([(TaskStatus(id="t", state=TaskState.SUCCEEDED), None)])
    got = await asyncio.wait_for(waiter, 5)
    assert got is not None and time.monotonic() - written_at < 0.5


async def test_a_held_write_lock_delays_writes_but_loses_none(
    db: Path, adapters: list[SqliteBroker | SqliteBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite's own busy wait is made shorter than the lock, so our retries are what save the write.
    monkeypatch.setattr(_db, "BUSY_TIMEOUT_MS", 20)
    broker = open_broker(adapters, db)
    await broker.ping()
    locked = threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.5)
        conn.execute("ROLLBACK")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    await asyncio.to_thread(locked.wait)
    start = time.monotonic()
    await broker.publish([Envelope(name="t", args={"i": i}) for i in range(3)])
    waited = time.monotonic() - start
    await asyncio.to_thread(holder.join)
    assert waited >= 0.3
    assert (await broker.stats("default")).pending == 3


async def test_cancelled_fetch_gives_its_claim_back(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    broker = open_broker(adapters, db)
    await broker.publish([Envelope(name="t", visibility_timeout=60)])
    real_claim = broker._claim_sql
    claiming = threading.Event()

    def slow_claim(*args: object) -> Callable[[sqlite3.Connection], object]:
        fn = real_claim(*args)  # type: ignore[arg-type]

        def run(conn: sqlite3.Connection) -> object:
            claiming.set()
            time.sleep(0.3)  # a claim still running when the fetch is cancelled
            return fn(conn)

        return run

    broker._claim_sql = slow_claim  # type: ignore[method-assign]
    fetch = asyncio.create_task(broker.fetch(["default"], 1, block=5, consumer="c"))
    await asyncio.to_thread(claiming.wait)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    broker._claim_sql = real_claim  # type: ignore[method-assign]

    async def given_back() -> bool:
        s = await broker.stats("default")
        return (s.pending, s.in_flight) == (1, 0)

    await eventually(given_back, timeout=5)


async def test_expired_results_are_purged_by_a_later_write(
    db: Path, adapters: list[SqliteBroker | SqliteBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_mod, "PURGE_INTERVAL", 0.0)
    backend = open_backend(adapters, db)
    await backend.set_many([(TaskStatus(id="old", state=TaskState.SUCCEEDED), 0.01)])

    def rows() -> int:
        with sqlite3.connect(db) as conn:
            n: int = conn.execute("SELECT COUNT(*) FROM stem_results").fetchone()[0]
            return n

    assert rows() == 1

    async def purged() -> bool:
        await backend.set_many([(TaskStatus(id="new", state=TaskState.QUEUED), None)])
        return rows() == 1 and await backend.get("old") is None

    await eventually(purged, timeout=5)


# -- real processes ---------------------------------------------------------------------

_CHILD = """
import asyncio, sys, orjson
from stem.adapters import broker_from_url, backend_from_url
from stem.envelope import Envelope
from stem.status import TaskStatus, TaskState

async def main(action, url):
    if action == "consume":
        broker = broker_from_url(url)
        ids = []
        while batch := await broker.fetch(["default"], 5, block=0.5, consumer=sys.argv[3]):
            ids.extend(d.envelope.id for d in batch)
        await broker.close()
        sys.stdout.write(orjson.dumps(ids).decode())
    elif action == "publish":
        broker = broker_from_url(url)
        await broker.publish([Envelope(name="t", id="from-child")])
        await broker.close()
    elif action == "finish":
        backend = backend_from_url(url)
        await backend.set_many([(TaskStatus(id="from-child", state=TaskState.SUCCEEDED), None)])
        await backend.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def run_child(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return out


async def test_two_processes_never_lease_the_same_envelope(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    broker = open_broker(adapters, db)
    envelopes = [Envelope(name="t", args={"i": i}) for i in range(500)]
    await broker.publish(envelopes)
    outs = await asyncio.gather(
        run_child("consume", url(db), "p1"), run_child("consume", url(db), "p2")
    )
    first, second = (orjson.loads(o) for o in outs)
    assert set(first).isdisjoint(second)
    assert len(first) + len(second) == 500
    assert set(first) | set(second) == {e.id for e in envelopes}


async def test_publish_from_another_process_reaches_a_blocked_fetch(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    broker = open_broker(adapters, db)
    await broker.ping()
    fetch = asyncio.create_task(broker.fetch(["default"], 1, block=30, consumer="c"))
    await run_child("publish", url(db))
    child_done = time.monotonic()
    got = await asyncio.wait_for(fetch, 10)
    assert [d.envelope.id for d in got if d.envelope] == ["from-child"]
    assert time.monotonic() - child_done < 0.5


async def test_result_from_another_process_ends_wait(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    backend = open_backend(adapters, db)
    await backend.ping()
    waiter = asyncio.create_task(backend.wait("from-child", timeout=30))
    await run_child("finish", url(db))
    child_done = time.monotonic()
    got = await asyncio.wait_for(waiter, 10)
    assert got is not None and got.state is TaskState.SUCCEEDED
    assert time.monotonic() - child_done < 0.5


# -- hardening: file mode, stored values ------------------------------------------


def _mode(path: Path | str) -> int | None:
    """Permission bits of ``path``, None when it does not exist."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None


def _create_with_mode(path: Path, mode: int) -> None:
    path.touch()
    path.chmod(mode)


async def test_the_database_file_and_its_wal_are_private(
    tmp_path: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    # The file holds payloads and results: owner-only, whatever the umask says.
    path = tmp_path / "sub" / "private.db"
    old = os.umask(0o022)
    try:
        broker = open_broker(adapters, path)
        backend = open_backend(adapters, path)
        await broker.publish([Envelope(name="t")])
        await backend.set_many([(TaskStatus(id="x", state=TaskState.SUCCEEDED, payload=1), None)])
        [d] = await broker.fetch(["default"], 1, block=0, consumer="w")
        await broker.ack([d])
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert _mode(f"{path}-wal") == 0o600 and _mode(f"{path}-shm") == 0o600


async def test_an_existing_database_file_keeps_its_mode(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    _create_with_mode(db, 0o640)  # widened on purpose by an operator: left alone
    await open_broker(adapters, db).ping()
    assert _mode(db) == 0o640


async def test_rows_with_odd_stored_values_are_all_handed_out_with_bounded_leases(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    broker = open_broker(adapters, db)
    await broker.ping()
    # Rows as another program (or an older version) may have written them.
    odd: list[tuple[object, object]] = [
        (0, 1e13), (0, 1e308), (0, float("inf")), (0, float("-inf")), (0, -5.0),
        (0, "soon"), (0, b"\x00"), ("high", 30.0), (3.5, None),
    ]
    with sqlite3.connect(db) as conn:
        for i, (priority, vt) in enumerate(odd):
            conn.execute(
                "INSERT INTO stem_jobs (queue, priority, not_before, vt, raw) VALUES (?, ?, 0, ?, ?)",
                ("default", priority, vt, Envelope(name="t", args={"i": i}).to_json()),
            )
    await broker.publish([Envelope(name="t", args={"i": len(odd)})])
    got = await broker.fetch(["default"], 100, block=0, consumer="w")
    assert len(got) == len(odd) + 1
    now = time.time()
    for d in got:
        assert d.lease_expires_at is not None
        assert now - 5 < d.lease_expires_at <= now + 7 * 86_400 + 5, d.lease_expires_at


async def test_publish_raw_stores_clamped_priority_and_lease(
    db: Path, adapters: list[SqliteBroker | SqliteBackend]
) -> None:
    broker = open_broker(adapters, db)
    raw = Envelope(name="t", visibility_timeout=60).to_json()
    await broker.publish_raw("default", raw, priority=42)
    await broker.publish([Envelope(name="t", priority=42)])
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT priority, vt, raw FROM stem_jobs ORDER BY id").fetchall()
    assert [(p, vt) for p, vt, _ in rows] == [(9, 60.0), (9, None)]
    assert rows[0][2] == raw  # the bytes themselves are kept as given
