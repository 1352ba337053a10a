"""SQLite plumbing shared by the broker and the backend.

* :class:`Database` owns one connection on one dedicated thread, so the event loop
  never blocks on disk I/O or on another process's lock, and calls on one adapter
  are serialised without a lock of ours.
* Every write is one ``BEGIN IMMEDIATE`` transaction; ``database is locked`` (another
  process writing) is retried with backoff, so writes are delayed, never dropped.
* :class:`Hub` lets adapters on the same file in the same process wake each other
  (SQLite has no notifications): fetches and waits otherwise poll briefly.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from stem.adapters._shared import (
    Waiter,
    check_namespace,
)
from stem.errors import ServiceUnavailableError
from stem.log import get_logger

# Re-exported: the adapters (and callers of old) import them from here.
from ._paths import dead_letter_retention_from_url as dead_letter_retention_from_url
from ._paths import path_from_url as path_from_url

T = TypeVar("T")

log = get_logger(__name__)

#: Milliseconds SQLite itself waits for another writer before reporting "locked".
BUSY_TIMEOUT_MS = 5_000
#: Further attempts (with backoff) after SQLite's own wait gave up.
LOCK_RETRIES = 8
#: Poll interval of an idle blocking fetch (another process may have published).
FETCH_POLL_INTERVAL = 0.025
#: Poll interval of ``wait()`` for results written by other processes.
WAIT_POLL_INTERVAL = 0.05
#: Bound parameters per ``IN (...)`` list, well under SQLite's variable limit.
CHUNK = 500

SCHEMA_TABLE = "stem_schema_version"


def table_prefix(namespace: str) -> str:
    """The table-name prefix of ``namespace``: the namespace itself, which must follow
    the one namespace rule (:func:`stem.adapters._shared.check_namespace`), so two
    namespaces never map to the same tables (``a-b`` and ``a_b`` stay apart)."""
    return check_namespace(namespace)


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier (table names may contain ``-``)."""
    return '"' + name.replace('"', '""') + '"'


def create_private(path: str) -> None:
    """Create the database file readable and writable by its owner only (0600).

    It holds task payloads and results. SQLite creates the ``-wal`` and ``-shm``
    files with the database file's permissions, so they are private too. An existing
    file keeps the mode it has (an operator may have widened it on purpose).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
    finally:
        os.close(fd)


def placeholders(n: int) -> str:
    """``?, ?, ...`` for an ``IN`` list of ``n`` values."""
    return ", ".join("?" * n)


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the file's write lock up front.

    Taking it at BEGIN (not at the first write) is what makes "select ready rows,
    then lease them" atomic across processes, and avoids the deadlock-prone upgrade
    from a read to a write transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def ensure_schema(conn: sqlite3.Connection, name: str, version: int, ddl: Sequence[str]) -> None:
    """Create tables if missing and record their schema version (idempotent)."""
    with immediate(conn):
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} "
            "(name TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        for statement in ddl:
            conn.execute(statement)
        conn.execute(
            f"INSERT OR IGNORE INTO {SCHEMA_TABLE} (name, version) VALUES (?, ?)", (name, version)
        )


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Database:
    """One SQLite connection living on its own thread.

    ``setup`` runs once per connection (schema creation). The connection is opened
    on first use and reopened after :meth:`close`, so an adapter object stays usable.
    """

    def __init__(self, path: str, setup: Callable[[sqlite3.Connection], None] | None = None
                 ) -> None:
        self.path = path
        self._setups: list[Callable[[sqlite3.Connection], None]] = [setup] if setup else []
        self._pending: list[Callable[[sqlite3.Connection], None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def add_setup(self, setup: Callable[[sqlite3.Connection], None]) -> None:
        """Also run ``setup`` on the connection (now on its thread if it is already open).

        How a store's parts (broker, backend, ...) create their tables on the one
        connection they share.
        """
        self._setups.append(setup)
        if self._conn is not None:
            self._pending.append(setup)

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # WAL: readers never block the writer, so other processes' polls are cheap.
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across application crashes in WAL mode; only a power
            # loss can drop the last commits, which a task queue on one host accepts.
            conn.execute("PRAGMA synchronous = NORMAL")
            for setup in self._setups:
                setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on this thread's connection, retrying while the file is locked."""
        delay = 0.01
        for attempt in range(LOCK_RETRIES + 1):
            try:
                if self._conn is None:
                    self._pending.clear()
                    self._conn = self._connect()
                while self._pending:
                    self._pending[0](self._conn)
                    self._pending.pop(0)
                return fn(self._conn)
            except sqlite3.OperationalError as exc:
                # A failed COMMIT leaves its transaction open; the retry needs a clean slate.
                if self._conn is not None and self._conn.in_transaction:
                    self._conn.rollback()
                if not _is_locked(exc) or attempt == LOCK_RETRIES:
                    raise ServiceUnavailableError(
                        f"SQLite database {self.path}: {exc}; check the file and its "
                        "directory are writable and no other program holds a long "
                        "transaction on it"
                    ) from exc
                log.warning("sqlite.database_locked", path=self.path, attempt=attempt)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise
            except (sqlite3.DatabaseError, OSError) as exc:
                raise ServiceUnavailableError(
                    f"SQLite database {self.path} is unusable: {exc}"
                ) from exc
        raise AssertionError("unreachable")

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Schedule ``fn(conn)`` on the database thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="stem-sqlite")
        return asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the database thread and return its result."""
        return await self.submit(fn)

    async def close(self) -> None:
        """Close the connection and stop the thread (a later call reopens them)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def _close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        await asyncio.get_running_loop().run_in_executor(executor, _close)
        executor.shutdown(wait=False)


@dataclass(eq=False)
class Hub:
    """In-process wake-ups for every adapter on one file and table prefix."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    fetchers: set[Waiter] = field(default_factory=set)
    results: dict[str, set[Waiter]] = field(default_factory=dict)
    #: ``time.monotonic()`` of the last batched result poll (shared by all waits).
    last_result_poll: float = 0.0

    def watch_queues(self) -> Waiter:
        """Arm a waiter that the next publish (or nack, replay) in this process wakes."""
        w = Waiter()
        with self.lock:
            self.fetchers.add(w)
        return w

    def unwatch_queues(self, w: Waiter) -> None:
        """Disarm a fetch waiter."""
        with self.lock:
            self.fetchers.discard(w)

    def queues_changed(self) -> None:
        """Wake every armed fetch waiter."""
        with self.lock:
            woken, self.fetchers = self.fetchers, set()
        for w in woken:
            w.wake()

    def watch_result(self, task_id: str, old: Waiter | None = None) -> Waiter:
        """Arm a waiter for ``task_id`` (replacing ``old``, already woken)."""
        w = Waiter()
        with self.lock:
            waiters = self.results.setdefault(task_id, set())
            if old is not None:
                waiters.discard(old)
            waiters.add(w)
        return w

    def unwatch_result(self, task_id: str, w: Waiter) -> None:
        """Disarm a result waiter."""
        with self.lock:
            waiters = self.results.get(task_id)
            if waiters is not None:
                waiters.discard(w)
                if not waiters:
                    del self.results[task_id]

    def watched_results(self) -> list[str]:
        """Task ids someone in this process is waiting for."""
        with self.lock:
            return list(self.results)

    def results_done(self, task_ids: Sequence[str]) -> None:
        """Wake the waiters of ``task_ids`` (their status became terminal)."""
        with self.lock:
            woken = [w for i in task_ids for w in self.results.get(i, ())]
        for w in woken:
            w.wake()


_hubs: dict[tuple[str, str], Hub] = {}
_hubs_lock = threading.Lock()


def hub_for(path: str, prefix: str) -> Hub:
    """The process-wide :class:`Hub` of one database file and table prefix."""
    key = (os.path.realpath(path), prefix)
    with _hubs_lock:
        hub = _hubs.get(key)
        if hub is None:
            hub = _hubs[key] = Hub()
        return hub
