"""Connections for the Postgres adapters: URL parsing, a lazy asyncpg pool, retries
across outages, and a self-healing LISTEN connection.

Nothing here does I/O at construction: the pool is created (and the schema migrated)
by the first operation, so building an app never needs a reachable server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from stem._urls import mask_url, redact
from stem.adapters._shared import (
    DEFAULT_DEAD_LETTER_RETENTION,
    check_namespace,
    parse_retention,
)
from stem.adapters.postgres import migrations
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.log import get_logger
from stem.tls import tls_hint

log = get_logger(__name__)

T = TypeVar("T")

#: Schema used when the URL has no ``?schema=``.
DEFAULT_SCHEMA = "stem"
#: Query parameters Stem reads itself; asyncpg would send unknown ones to the server
#: as settings (and the server rejects them), so they are removed from the DSN.
STEM_PARAMS = frozenset({"schema", "pool_size", "connect_timeout", "dead_letter_retention"})

_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: Postgres identifiers (channel names too) are cut at 63 bytes.
_MAX_IDENT = 63


@dataclass(frozen=True, slots=True)
class PgSettings:
    """A parsed ``postgres://`` URL: the DSN asyncpg gets plus Stem's own options."""

    dsn: str
    schema: str
    pool_size: int
    connect_timeout: float
    #: ``host:port/db (user u)`` for messages; never contains the password.
    display: str
    #: Seconds dead letters are kept (``?dead_letter_retention=``, default 7 days).
    dead_letter_retention: float = DEFAULT_DEAD_LETTER_RETENTION

    @property
    def quoted_schema(self) -> str:
        """The schema as a quoted SQL identifier (validated, so quoting is enough)."""
        return f'"{self.schema}"'

    def channel(self, kind: str) -> str:
        """A NOTIFY channel name unique to this schema and ``kind``, within 63 bytes."""
        name = f"stem_{kind}_{self.schema}"
        if len(name) > _MAX_IDENT:
            name = f"stem_{kind}_" + hashlib.md5(self.schema.encode()).hexdigest()
        return name


def parse_url(url: str, namespace: str = DEFAULT_SCHEMA) -> PgSettings:
    """Split a ``postgres://`` / ``postgresql://`` URL into asyncpg's DSN and Stem options.

    Without ``?schema=`` the schema is the namespace (the app's: ``namespace=``,
    ``STEM_NAMESPACE`` or its name; see docs/storage.md) verbatim, so apps with
    different namespaces on one database never share queues. The namespace must follow the one namespace rule (at most 63 characters,
    within Postgres' identifier limit), else ConfigurationError.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError(f"not a Postgres URL: scheme {parts.scheme!r}")
    if "@" in parts.path + parts.query + parts.fragment:
        # asyncpg would read part of the password as the host or port, and quote it.
        raise ConfigurationError(
            f"Postgres URL {mask_url(url)!r} has an '@' after the host; percent-encode "
            "'@', '/', '?' and '#' in the password (%40 %2F %3F %23)"
        )
    for hostspec in parts.netloc.rpartition("@")[2].split(","):
        port = hostspec.rpartition("]")[2].partition(":")[2]
        if port and not port.isdigit():  # asyncpg would raise a bare ValueError
            raise ConfigurationError(
                f"Postgres URL {mask_url(url)!r} has a bad port {port!r}; use host:5432"
            )
    params = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in params if k in STEM_PARAMS}
    rest = [(k, v) for k, v in params if k not in STEM_PARAMS]
    empty = sorted(k for k, v in ours.items() if not v)
    if empty:
        raise ConfigurationError(f"Postgres URL: ?{empty[0]}= needs a value")
    check_namespace(namespace)
    schema = ours["schema"] if "schema" in ours else namespace
    if "schema" in ours and not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"Postgres URL ?schema={schema!r} is not a plain identifier; use letters, "
            "digits and underscores (at most 63, not starting with a digit)"
        )
    try:
        pool_size = int(ours.get("pool_size") or 10)
        connect_timeout = float(ours.get("connect_timeout") or 5.0)
    except ValueError as exc:
        raise ConfigurationError(
            f"Postgres URL has a bad pool_size/connect_timeout: {exc}"
        ) from exc
    if pool_size < 1 or not 0 < connect_timeout < math.inf:  # NaN fails too
        raise ConfigurationError("Postgres URL needs pool_size >= 1 and connect_timeout > 0")
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), parts.fragment))
    user, _, hostport = parts.netloc.rpartition("@")
    user = user.partition(":")[0]
    host = hostport or dict(rest).get("host") or "localhost"
    db = parts.path.lstrip("/") or dict(rest).get("dbname") or user or "(default)"
    display = f"{host}/{db}" + (f" (user {user})" if user else "")
    retention = DEFAULT_DEAD_LETTER_RETENTION
    if "dead_letter_retention" in ours:
        retention = parse_retention(ours["dead_letter_retention"], "Postgres")
    return PgSettings(dsn, schema, pool_size, connect_timeout, display, retention)


#: Errors that mean "the connection or server went away", worth reconnecting for.
#: Query cancellations, constraint violations and the like are not in this list.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    # Raised when a pooled connection is used in the instant between the server's
    # termination message and the socket closing (the protocol is mid-error).
    asyncpg.InternalClientError,
)


#: Errors at login that retrying will not fix (bad credentials, unknown database).
_LOGIN_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the connection is gone rather than the query is wrong."""
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    # asyncpg raises a bare InterfaceError when a pooled connection died between uses.
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


def _detached(exc: BaseException) -> bool:
    """True when a kept pool connection was closed while idle: the pool then takes its
    proxy back, and the first call on it fails before sending anything."""
    return isinstance(exc, asyncpg.InterfaceError) and "released back to the pool" in str(exc)


def unavailable(settings: PgSettings, exc: BaseException, role: str) -> ServiceUnavailableError:
    """A ServiceUnavailableError naming the server (no password) and what to check."""
    tls = tls_hint(exc, settings.dsn)
    if tls is not None:
        hint = tls
    elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        hint = "the server rejected the login; check the user and password in the URL"
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        hint = "the database does not exist; create it or fix the database name in the URL"
    elif isinstance(exc, asyncpg.TooManyConnectionsError):
        hint = "the server has no free connections; lower ?pool_size= or raise max_connections"
    elif isinstance(exc, TimeoutError):
        hint = (
            "no answer within the connect timeout; check the host/port, firewalls, and "
            "that the server is up (?connect_timeout= sets the limit)"
        )
    else:
        hint = (
            "check that the server is running and accepts TCP connections at that "
            "host and port, and that the URL is right"
        )
    detail = redact(str(exc) or type(exc).__name__, settings.dsn)
    return ServiceUnavailableError(
        f"Postgres {role} at {settings.display} is unreachable: {detail}; {hint}"
    )


def _backoff(attempt: int) -> float:
    # Full jitter so many workers reconnecting after a restart don't arrive in lockstep.
    return random.uniform(0.0, min(2.0, 0.05 * (2**attempt))) + 0.01


class Connector:
    """A lazily created asyncpg pool with migrations on first connect and retries.

    ``run(op)`` acquires a connection and runs ``op`` on it. When the connection or
    server goes away after Stem has been connected once, the operation is retried with
    backoff for up to ``reconnect_window`` seconds (an outage is logged once, and its
    end once). Before the first successful connect, errors are raised at once as
    :class:`ServiceUnavailableError`: that is almost always a wrong URL, and the user
    should hear about it immediately.
    """

    #: Seconds an operation keeps retrying through an outage before giving up.
    reconnect_window: float = 15.0

    def __init__(self, settings: PgSettings, role: str, *, pool: Any = None) -> None:
        self.settings = settings
        self.role = role
        # A pool the application passed in is used as is (migrated on first use) and
        # never closed here.
        self._external = pool
        self._pool: Any = None
        # One connection of our own pool kept checked out between operations: ``run``
        # takes it when it is free instead of going through the pool. asyncpg's acquire
        # and release (a shielded task and an idle timer per release) were a seventh of a
        # one-by-one enqueue's CPU. Never for an application's pool (it may be small).
        self._hot: Any = None
        self._lock: asyncio.Lock | None = None
        self._ever_connected = False
        self._outage_since: float | None = None

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None and self._external is not None:
                async with self._external.acquire() as conn:
                    await migrations.apply(conn, self.settings.quoted_schema)
                self._pool = self._external
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self.settings.dsn,
                    # No floor: asyncpg would keep reconnecting one in the background
                    # during an outage, logging a traceback each time.
                    min_size=0,
                    max_size=self.settings.pool_size,
                    timeout=self.settings.connect_timeout,
                    server_settings=_server_settings(self.settings.dsn),
                    reset=_keep_session,
                )
                try:
                    async with pool.acquire() as conn:
                        await migrations.apply(conn, self.settings.quoted_schema)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    async def run(self, op: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``op(connection)`` on a pooled connection, reconnecting through outages."""
        hot, pool = self._hot, self._pool
        if hot is not None:
            # The common case: the kept connection is free (taken by setting it aside).
            self._hot = None
            try:
                result = await op(hot)
            except BaseException as exc:
                # The pool resets it (an open transaction, a cut-off query) or, after a
                # connection error, replaces it. The operation then goes through the pool
                # below: always when nothing was sent (the connection had closed while
                # kept), after a connection error only where it may be retried.
                await self._give_back(pool, hot, exc)
                if not _detached(exc):
                    if not is_connection_error(exc):
                        raise
                    if not retry:
                        self._note_outage(exc)
                        raise unavailable(self.settings, exc, self.role) from exc
            else:
                await self._keep(pool, hot)
                if self._outage_since is not None:
                    self._note_ok()
                return result
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                pool = await self._get_pool()
                conn = await pool.acquire()
                try:
                    result = await op(conn)
                except BaseException as exc:
                    await self._give_back(pool, conn, exc)
                    raise
                await self._keep(pool, conn)
            except _LOGIN_ERRORS as exc:
                # Not an outage but a wrong URL: retrying cannot help.
                raise unavailable(self.settings, exc, self.role) from exc
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                give_up = (
                    not retry
                    or not self._ever_connected
                    or time.monotonic() - started > self.reconnect_window
                )
                self._note_outage(exc)
                if give_up:
                    raise unavailable(self.settings, exc, self.role) from exc
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            self._note_ok()
            return result

    def _note_outage(self, exc: BaseException) -> None:
        if self._outage_since is None and self._ever_connected:
            self._outage_since = time.monotonic()
            log.warning(
                "postgres.connection_lost",
                role=self.role,
                server=self.settings.display,
                error=redact(str(exc) or type(exc).__name__, self.settings.dsn),
            )

    def _note_ok(self) -> None:
        self._ever_connected = True
        if self._outage_since is not None:
            log.info(
                "postgres.connection_restored",
                role=self.role,
                server=self.settings.display,
                outage_seconds=round(time.monotonic() - self._outage_since, 3),
            )
            self._outage_since = None

    async def _keep(self, pool: Any, conn: Any) -> None:
        """After a successful operation: keep ``conn`` as the free connection, or give it
        back to ``pool`` (one is kept already, the pool is the application's, or it was
        closed meanwhile)."""
        if self._hot is None and pool is self._pool and pool is not self._external:
            self._hot = conn
        else:
            await pool.release(conn)

    @staticmethod
    async def _give_back(pool: Any, conn: Any, exc: BaseException) -> None:
        """After a failed operation: hand ``conn`` back to ``pool``, which rolls back or
        cancels what it was doing. Never a half-dead connection: the next acquire then
        opens a fresh one. (A connection that already closed has detached itself.)"""
        if _detached(exc):
            return  # the pool has it back already
        if is_connection_error(exc):
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
        try:
            await pool.release(conn)
        except Exception as release_exc:  # the operation's own error is the one to raise
            log.debug("postgres.release_failed", error=repr(release_exc))

    async def ready(self) -> None:
        """Connect and migrate now (normally the first operation does it)."""
        await self.run(lambda c: c.fetchval("SELECT 1"))

    async def connect_dedicated(self) -> Any:
        """A new connection outside the pool (for LISTEN), after migrations ran."""
        await self.ready()
        try:
            return await asyncpg.connect(
                self.settings.dsn,
                timeout=self.settings.connect_timeout,
                server_settings=_server_settings(self.settings.dsn),
            )
        except _LOGIN_ERRORS as exc:
            raise unavailable(self.settings, exc, self.role) from exc

    async def close(self) -> None:
        """Close the pool (not an application's own); a later operation opens a new one."""
        pool, self._pool = self._pool, None
        hot, self._hot = self._hot, None
        if hot is not None and pool is not None:
            await pool.release(hot)  # close() waits for every acquired connection
        if pool is not None and pool is not self._external:
            await pool.close()


async def _keep_session(_conn: Any) -> None:
    """Pool reset hook that skips asyncpg's default reset.

    The default runs ``RESET ALL; UNLISTEN *; ...`` — a round-trip on every release,
    which halved one-by-one enqueue throughput. Stem never changes session state on
    pooled connections (LISTEN has its own connection; advisory locks are
    transaction-scoped), and asyncpg still rolls back an open transaction itself.
    """


def _server_settings(dsn: str) -> dict[str, str]:
    # Queue statements are tiny; JIT compilation only ever adds latency to them.
    # Both are defaults the URL may override (asyncpg passes unknown params as settings).
    given = {k for k, _ in parse_qsl(urlsplit(dsn).query)}
    # stem-<pid> tells operators (and tests) in pg_stat_activity which process it is.
    out = {"application_name": f"stem-{os.getpid()}", "jit": "off"}
    return {k: v for k, v in out.items() if k not in given}


class ListenHub:
    """One dedicated connection LISTENing on every channel a store's parts watch.

    Re-established after it drops. Each channel has ``on_notify(payload)`` for its
    notifications and ``on_reset()``, which runs whenever the connection is lost or
    re-established, because notifications may have been missed meanwhile and waiters
    must look at the database again.
    """

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._channels: dict[str, tuple[Callable[[str], None], Callable[[], None]]] = {}
        self._listening: set[str] = set()
        self._conn: Any = None
        self._lock: asyncio.Lock | None = None
        self._closing = False
        self._failures = 0
        self._retry_at = 0.0

    @property
    def active(self) -> bool:
        """True while the LISTEN connection is up."""
        return self._conn is not None and not self._conn.is_closed()

    def channel(self, name: str, on_notify: Callable[[str], None], on_reset: Callable[[], None]
                ) -> Listener:
        """Watch channel ``name`` (LISTEN starts at the next :meth:`Listener.ensure`)."""
        listener = Listener(self, name, on_notify, on_reset)
        listener.register()
        return listener

    async def ensure(self, channel: str) -> bool:
        """Make sure ``channel`` is LISTENed on; False (never raise) when it can't be now.

        Callers fall back to a short poll while this returns False; reconnect attempts
        are spaced with backoff so a down server is not hammered.
        """
        if self.active and channel in self._listening:
            return True
        if self._closing or channel not in self._channels or (
                not self.active and time.monotonic() < self._retry_at):
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.active and channel in self._listening:
                return True
            fresh = not self.active
            try:
                if fresh:
                    self._listening.clear()
                    conn = await self._connector.connect_dedicated()
                else:
                    conn = self._conn
                try:
                    # A copy: a part may register its channel while we await here.
                    for name in list(self._channels):
                        if name not in self._listening:
                            await conn.add_listener(name, self._dispatch)
                            self._listening.add(name)
                except BaseException:
                    if fresh:
                        self._listening.clear()
                        await conn.close()
                    raise
            except Exception as exc:
                if not is_connection_error(exc) and not isinstance(exc, ServiceUnavailableError):
                    raise
                self._retry_at = time.monotonic() + _backoff(self._failures)
                self._failures += 1
                if self._failures == 1:
                    log.warning(
                        "postgres.listen_unavailable",
                        channel=channel,
                        server=self._connector.settings.display,
                        error=redact(str(exc) or type(exc).__name__,
                                     self._connector.settings.dsn),
                    )
                return False
            if fresh:
                conn.add_termination_listener(self._terminated)
                self._conn = conn
                if self._failures:
                    log.info("postgres.listen_restored", channels=sorted(self._listening))
                self._failures = 0
        # Anything published while we were not listening must be looked for now.
        if fresh:
            self._reset_all()
        else:
            self._channels[channel][1]()
        return True

    def _reset_all(self) -> None:
        for _, on_reset in list(self._channels.values()):
            on_reset()

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        handlers = self._channels.get(channel)
        if handlers is not None:
            handlers[0](payload)

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._conn = None
            self._listening.clear()
        if not self._closing:
            self._reset_all()

    async def drop(self, channel: str) -> None:
        """Stop watching ``channel``; the connection closes with the last one."""
        self._channels.pop(channel, None)
        if self._channels:
            if channel in self._listening and self.active:
                self._listening.discard(channel)
                with contextlib.suppress(Exception):
                    await self._conn.remove_listener(channel, self._dispatch)
            return
        await self.close()

    async def close(self) -> None:
        """Stop listening and close the connection."""
        self._closing = True
        self._listening.clear()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2.0)
            except Exception:
                conn.terminate()


class Listener:
    """One part's channel on a :class:`ListenHub` (a store's, or a part's own)."""

    def __init__(self, hub: ListenHub, channel: str, on_notify: Callable[[str], None],
                 on_reset: Callable[[], None]) -> None:
        self.hub = hub
        self.channel = channel
        self._handlers = (on_notify, on_reset)

    def register(self) -> None:
        """(Re-)add this channel to the hub (after a close, the part may be used again)."""
        self.hub._channels[self.channel] = self._handlers
        self.hub._closing = False

    @property
    def active(self) -> bool:
        """True while this channel is being listened on."""
        return self.hub.active and self.channel in self.hub._listening

    async def ensure(self) -> bool:
        """See :meth:`ListenHub.ensure`."""
        if self.channel not in self.hub._channels:
            self.register()
        return await self.hub.ensure(self.channel)

    async def close(self) -> None:
        """Stop watching the channel (the hub closes its connection with the last one)."""
        await self.hub.drop(self.channel)
