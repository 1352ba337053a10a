"""Redis URLs, clients and the connections blocking reads use.

Nothing here does I/O until a command runs: :class:`RedisConnector` builds its client
on first use, so constructing a broker or backend is free and ``ping()`` is where a
wrong URL or a stopped server shows up, as a :class:`ServiceUnavailableError` that
names the URL (never the password) and what to check.

URL forms (Stem's own tunables are query parameters and are stripped before the
rest of the query goes to redis-py, which understands e.g. ``socket_timeout`` and
the ``ssl_*`` options):

- ``redis://[[user]:password@]host[:port][/db]``
- ``rediss://...`` the same over TLS
- ``redis://host:port?cluster=1`` Redis Cluster (``host:port`` is any node)
- ``redis+sentinel://[[user]:password@]host:port[,host2:port2]/service_name[/db]``
  (``?ssl=1`` for TLS, ``?sentinel_password=...`` when the sentinels need one)
"""

from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    ConnectionPool,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import ExponentialBackoff

from stem._urls import mask_url, redact
from stem.errors import ConfigurationError, ServiceUnavailableError
from stem.limits import visibility_timeout_problem
from stem.tls import tls_hint

Mode = Literal["standalone", "cluster", "sentinel"]
Client = aioredis.Redis | RedisCluster

#: Errors that mean "the server could not be reached or answered nothing".
#: (redis-py's AuthenticationError and sentinel's MasterNotFoundError are
#: ConnectionErrors; a cluster with no reachable node raises RedisClusterException.)
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.RedisClusterException,
    OSError,
)

#: Query parameters that configure Stem (never passed to redis-py).
STEM_OPTIONS = frozenset(
    {
        "cluster",
        "block_time",
        "claim_interval",
        "default_visibility_timeout",
        "result_ttl",
        "dead_letter_max",
        "sentinel_password",
        "sentinel_username",
    }
)
#: Query parameters passed on to redis-py (validated by its URL parser where it has
#: one). Any other key is a ConfigurationError: nothing is accepted and then ignored.
REDIS_PY_OPTIONS = frozenset(
    {
        "db",
        "username",
        "password",
        "client_name",
        "health_check_interval",
        "max_connections",
        "retry_on_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_read_size",
        "socket_timeout",
        "ssl",
    }
)
#: redis-py's TLS options: only with ``rediss://`` or ``?ssl=1``.
TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_cert_reqs",
        "ssl_certfile",
        "ssl_check_hostname",
        "ssl_ciphers",
        "ssl_exclude_verify_flags",
        "ssl_include_verify_flags",
        "ssl_keyfile",
        "ssl_min_version",
        "ssl_password",
    }
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
#: Default cap of each queue's dead-letter stream (``?dead_letter_max=``).
DEFAULT_DEAD_LETTER_MAX = 100_000

#: Fail a connection attempt to an unreachable host within this many seconds
#: (overridable with ``?socket_connect_timeout=``).
DEFAULT_CONNECT_TIMEOUT = 2.0


def keepalive_options() -> dict[int, int]:
    """TCP options for Stem's Redis connections: keepalive after 15 s idle, a probe every
    5 s, dead after 3 missed (about 30 s), and on Linux TCP_USER_TIMEOUT of 30 s for sent
    data that is never acknowledged. Only the options this platform has."""
    wanted = (("TCP_KEEPIDLE", 15), ("TCP_KEEPALIVE", 15), ("TCP_KEEPINTVL", 5),
              ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 30_000))
    out: dict[int, int] = {}
    for name, value in wanted:
        opt = getattr(socket, name, None)
        if opt is not None and opt not in out:  # macOS names idle time TCP_KEEPALIVE
            out[opt] = value
    return out


def safe_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` (for messages and logs)."""
    return mask_url(url)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """A parsed Stem Redis URL: how to connect plus Stem's own options."""

    url: str
    mode: Mode
    #: redis-py keyword arguments for connections (host/port only for standalone).
    connection_kwargs: dict[str, Any]
    #: (host, port) of each sentinel, or of the cluster's startup node.
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        return safe_url(self.url)

    def seconds(self, name: str, default: float) -> float:
        """A positive duration option from the query string (``?claim_interval=0.2``)."""
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value < math.inf:  # NaN fails too
            raise ConfigurationError(
                f"Redis URL {self.safe_url!r}: {name}={raw!r} must be a positive number of seconds"
            )
        return value

    def count(self, name: str, default: int) -> int:
        """A positive integer option from the query string (``?dead_letter_max=1000``)."""
        raw = self.options.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigurationError(
                f"Redis URL {self.safe_url!r}: {name}={raw!r} must be a positive whole number"
            )
        return int(raw)

    def validate(self) -> None:
        """Check every Stem option's value now, so a typo fails at startup, not later."""
        for name in ("block_time", "claim_interval", "result_ttl"):
            self.seconds(name, 1.0)
        self.count("dead_letter_max", 1)
        vt = self.options.get("default_visibility_timeout")
        if vt is not None:
            try:
                problem = visibility_timeout_problem(float(vt))
            except ValueError:
                problem = "not a number"
            if problem is not None:
                raise ConfigurationError(
                    f"Redis URL {self.safe_url!r}: default_visibility_timeout={vt!r}: {problem}"
                )
        cluster = self.options.get("cluster")
        if cluster is not None and cluster.lower() not in _TRUE | _FALSE:
            raise ConfigurationError(
                f"Redis URL {self.safe_url!r}: cluster={cluster!r} must be 1 or 0 (true/false)"
            )
        if self.mode != "sentinel":
            for name in ("sentinel_password", "sentinel_username"):
                if name in self.options:
                    raise ConfigurationError(
                        f"Redis URL {self.safe_url!r}: ?{name}= applies to "
                        "redis+sentinel:// URLs only"
                    )


def _check_query(url: str, scheme: str, query: list[tuple[str, str]]) -> None:
    """Refuse unknown, repeated or misplaced query keys (values are checked later)."""
    seen: set[str] = set()
    tls = scheme == "rediss" or any(k == "ssl" and v.lower() in _TRUE for k, v in query)
    for key, value in query:
        where = f"Redis URL {safe_url(url)!r}"
        if key in seen:
            raise ConfigurationError(f"{where} gives ?{key}= twice")
        seen.add(key)
        if key == "ssl" and value.lower() not in _TRUE | _FALSE:
            raise ConfigurationError(f"{where}: ssl={value!r} must be 1 or 0 (true/false)")
        if key in TLS_OPTIONS and not tls:
            raise ConfigurationError(
                f"{where}: ?{key}= is a TLS option; use rediss:// (or ?ssl=1) with it"
            )
        if key not in STEM_OPTIONS and key not in REDIS_PY_OPTIONS and key not in TLS_OPTIONS:
            raise ConfigurationError(
                f"{where} has an unknown option {key!r}. Stem's options: "
                f"{', '.join(sorted(STEM_OPTIONS))}; connection options: "
                f"{', '.join(sorted(REDIS_PY_OPTIONS))} and the ssl_* TLS options"
            )


def parse_redis_url(url: str) -> RedisSettings:
    """Parse a ``redis://``, ``rediss://`` or ``redis+sentinel://`` URL (no I/O)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "redis+sentinel"):
        raise ConfigurationError(
            f"not a Redis URL: {safe_url(url)!r}; use redis://host:6379/0, rediss://... "
            "or redis+sentinel://host:26379/service_name"
        )
    if "@" in parts.path + parts.query + parts.fragment:
        raise ConfigurationError(
            f"Redis URL {safe_url(url)!r} has an '@' after the host; percent-encode "
            "'@', '/', '?' and '#' in the password (%40 %2F %3F %23)"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    _check_query(url, parts.scheme, query)
    settings = _parse(url, parts, query)
    settings.validate()
    return settings


def _parse(url: str, parts: SplitResult, query: list[tuple[str, str]]) -> RedisSettings:
    options = {k: v for k, v in query if k in STEM_OPTIONS}
    rest = urlencode([(k, v) for k, v in query if k not in STEM_OPTIONS])
    if parts.scheme == "redis+sentinel":
        return _parse_sentinel(url, parts.netloc, parts.path, rest, options)
    try:
        port = parts.port
    except ValueError:  # the message would quote the "port", maybe a piece of the password
        raise ConfigurationError(
            f"Redis URL {safe_url(url)!r} has a bad port; percent-encode '/', '?', '#' "
            "and '@' in the password (%2F %3F %23 %40)"
        ) from None
    if not parts.hostname:
        raise ConfigurationError(f"Redis URL {safe_url(url)!r} has no host")
    clean = urlunsplit(parts._replace(query=rest, fragment=""))
    kwargs = _redis_py_kwargs(clean, url)
    if kwargs.pop("ssl", False):  # redis://...?ssl=1 means the same as rediss://
        kwargs["connection_class"] = SSLConnection
    if options.get("cluster", "").lower() in _TRUE:
        kwargs.pop("db", None)  # a cluster has only db 0
        kwargs.pop("port", None)
        host = str(kwargs.pop("host"))
        return RedisSettings(url, "cluster", kwargs, nodes=((host, port or 6379),), options=options)
    return RedisSettings(url, "standalone", kwargs, options=options)


def _parse_sentinel(
    url: str, netloc: str, path: str, rest: str, options: dict[str, str]
) -> RedisSettings:
    userinfo, _, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise ConfigurationError(f"sentinel URL {safe_url(url)!r}: empty host in {hosts!r}")
        try:
            nodes.append((unquote(host), int(port) if port else 26379))
        except ValueError as exc:
            raise ConfigurationError(f"sentinel URL {safe_url(url)!r}: bad port {port!r}") from exc
    segments = [unquote(s) for s in path.split("/") if s]
    if not segments:
        raise ConfigurationError(
            f"sentinel URL {safe_url(url)!r} names no service: use "
            "redis+sentinel://host:26379[,host2:26379]/service_name[/db]"
        )
    service, db = segments[0], segments[1] if len(segments) > 1 else "0"
    if not db.isdigit() or len(segments) > 2:
        raise ConfigurationError(f"sentinel URL {safe_url(url)!r}: bad database {path!r}")
    auth = f"{userinfo}@" if userinfo else ""
    kwargs = _redis_py_kwargs(f"redis://{auth}sentinel/{db}?{rest}", url)
    kwargs.pop("host", None)
    sentinel_kwargs: dict[str, Any] = {
        k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout", "ssl") if k in kwargs
    }
    if "sentinel_password" in options:
        sentinel_kwargs["password"] = options["sentinel_password"]
    if "sentinel_username" in options:
        sentinel_kwargs["username"] = options["sentinel_username"]
    return RedisSettings(
        url,
        "sentinel",
        kwargs,
        nodes=tuple(nodes),
        service_name=service,
        sentinel_kwargs=sentinel_kwargs,
        options=options,
    )


def _redis_py_kwargs(clean_url: str, original: str) -> dict[str, Any]:
    try:
        kwargs: dict[str, Any] = dict(parse_url(clean_url))
    except ValueError as exc:
        raise ConfigurationError(
            f"Redis URL {safe_url(original)!r}: {redact(str(exc), original)}"
        ) from exc
    if "ssl" in kwargs:
        kwargs["ssl"] = str(kwargs["ssl"]).lower() in _TRUE
    for name in ("socket_timeout", "socket_connect_timeout"):
        value = kwargs.get(name)
        # redis-py takes 0 as "time out at once": every command would fail.
        if value is not None and not 0 < float(value) < math.inf:
            raise ConfigurationError(
                f"Redis URL {safe_url(original)!r}: {name}={value!r} must be a positive "
                "number of seconds (leave socket_timeout out for no per-command deadline)")
    # Stem parses replies itself on the hot paths, in the RESP2 shapes.
    kwargs["protocol"] = 2
    kwargs.setdefault("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    # No per-command deadline unless asked (?socket_timeout=): redis-py 8 defaults to 5 s,
    # which wraps every send in asyncio.wait_for (a Task per command on Python 3.11) and
    # every read in a timeout, 15-25 % of a producer's CPU per enqueue. A dead server or
    # path is found by TCP instead: keepalive probes on an idle connection and
    # TCP_USER_TIMEOUT for data the server never acknowledges (both well under a minute).
    kwargs.setdefault("socket_timeout", None)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("socket_keepalive_options", keepalive_options())
    # One quick retry covers a pooled connection the server closed while idle; more
    # would re-send non-idempotent writes and hide outages from the caller, who has
    # its own backoff (the fetch loop, the worker).
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=0.05, base=0.01), 1))
    return kwargs


def build_client(settings: RedisSettings) -> Client:
    """A client for ``settings`` (no connection is opened here)."""
    kwargs = dict(settings.connection_kwargs)
    if settings.mode == "cluster":
        host, port = settings.nodes[0]
        if kwargs.pop("connection_class", None) is not None:
            kwargs["ssl"] = True
        return RedisCluster(host=host, port=port, **kwargs)
    if settings.mode == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.nodes), sentinel_kwargs=settings.sentinel_kwargs, **kwargs
        )
        assert settings.service_name is not None
        client: aioredis.Redis = sentinel.master_for(settings.service_name)
        return client
    return aioredis.Redis(connection_pool=ConnectionPool(**kwargs))


def unavailable(settings: RedisSettings, exc: BaseException, what: str) -> ServiceUnavailableError:
    """A ServiceUnavailableError for ``exc`` that names the URL and what to check."""
    if isinstance(exc, ServiceUnavailableError):
        return exc
    tls = tls_hint(exc, settings.url)
    if tls is not None:
        hint = tls
    elif isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        hint = "check the user name and password in the URL"
    elif settings.mode == "sentinel":
        hint = "check the sentinels are running and know the service name, and the master is up"
    elif settings.mode == "cluster":
        hint = "check the cluster nodes are running and cluster_state is ok"
    else:
        hint = (
            "check the server is running and the host, port, database and TLS (rediss://) settings"
        )
    detail = redact(str(exc) or type(exc).__name__, settings.url)
    if isinstance(exc, MasterNotFoundError):  # its message dumps every sentinel client's repr
        detail = f"no master found for service {settings.service_name!r}"
    return ServiceUnavailableError(
        f"{what}: Redis at {settings.safe_url} is not reachable ({detail}); {hint}"
    )


@dataclass(slots=True)
class BlockingConn:
    """A connection taken out of the pool for one blocking command.

    Blocking reads go on their own connection (never one shared with other commands)
    and learn their ``CLIENT ID`` in the same round trip, so another task can end the
    wait early with ``CLIENT UNBLOCK`` instead of closing the socket.
    """

    conn: AbstractConnection
    release: Callable[[], Awaitable[None]]
    node: ClusterNode | None = None


def pack_command(args: Sequence[Any]) -> bytes:
    """One command in the Redis protocol (RESP), as redis-py's ``pack_command`` makes it
    byte for byte, in a third of the time for the long argument lists of Stem's
    scripts (a settle names hundreds of entries). bytes, str (UTF-8), int and float."""
    parts = [b"*%d\r\n" % len(args)]
    add = parts.append
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif kind is float:
            data = repr(arg).encode()
        elif isinstance(arg, bytearray | memoryview):
            data = bytes(arg)
        else:
            raise rexc.DataError(f"cannot send a {kind.__name__} to Redis: {arg!r:.60}")
        add(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class Lanes:
    """Stem's hot commands on connections of their own, past redis-py's per-command path.

    redis-py 8 spends more CPU around a command than on it: a pool checkout and
    release with observability hooks and awaited metric recorders on each call —
    half of a producer's CPU per enqueue. The Lua scripts every publish, fetch and
    settle runs go here instead: connections taken from the client's pool once (so
    sentinel and TLS settings apply) and kept in a free list, each command sent and
    its reply read with redis-py's own connection, packer and parser. A connection
    that fails is left disconnected by redis-py and reconnects on its next use; one
    retry covers a connection the server closed while it was idle (as the client's
    Retry does). Not for Redis Cluster, whose commands route by slot.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self._connector = connector
        self._idle: list[AbstractConnection] = []
        self._taken: list[AbstractConnection] = []

    async def _take(self) -> AbstractConnection:
        client = self._connector.client
        assert isinstance(client, aioredis.Redis)
        conn: AbstractConnection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        self._taken.append(conn)
        return conn

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply (a ResponseError reply is raised)."""
        conn = self._idle.pop() if self._idle else await self._take()
        packed = pack_command(args)
        try:
            try:
                await conn.send_packed_command(packed)
                return await conn.read_response()
            except (rexc.ConnectionError, rexc.TimeoutError, OSError):
                await conn.disconnect(nowait=True)
                await conn.send_packed_command(packed)
                return await conn.read_response()
        finally:
            self._idle.append(conn)

    async def close(self) -> None:
        """Hand the connections back to the pool (which the client then closes)."""
        taken, self._taken, self._idle = self._taken, [], []
        client = self._connector._client
        if isinstance(client, aioredis.Redis):
            for conn in taken:
                await client.connection_pool.release(conn)


class LaneScript:
    """A Lua script run with EVALSHA on :class:`Lanes` (loaded on NOSCRIPT); called
    like redis-py's ``AsyncScript``: ``await script(keys, args)``."""

    def __init__(self, connector: RedisConnector, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._connector = connector

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        lanes = self._connector.lanes  # the current ones: a closed connector makes new
        try:
            return await lanes.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            await lanes.call("SCRIPT", "LOAD", self.source)
            return await lanes.call("EVALSHA", self.sha, len(keys), *keys, *args)


class RedisConnector:
    """The lazily built client of one broker or backend, plus connection helpers."""

    def __init__(self, settings: RedisSettings, *, client: Client | None = None) -> None:
        self.settings = settings
        # A client the application passed in is used as is and never closed here.
        self._external = client
        self._client: Client | None = client
        # Fixed for the connector's life; asked on every command path, and isinstance
        # against redis-py's cluster class walks typing's Protocol checks each time.
        self._is_cluster = settings.mode == "cluster" or isinstance(client, RedisCluster)
        self._cluster_ready = False
        self._lanes: Lanes | None = None

    def script(self, source: str) -> Any:
        """A callable running ``source`` (``await script(keys, args)``): on the
        :class:`Lanes` of a standalone or sentinel server, else redis-py's script."""
        if self.is_cluster:
            return self.client.register_script(source)
        return LaneScript(self, source)

    @property
    def lanes(self) -> Lanes:
        """The dedicated connections of hot commands (standalone and sentinel only)."""
        if self._lanes is None:
            self._lanes = Lanes(self)
        return self._lanes

    @property
    def is_cluster(self) -> bool:
        """True for Redis Cluster URLs (scripts and multi-key commands stay in one slot)."""
        return self._is_cluster

    @property
    def has_client(self) -> bool:
        """True once the client exists (something has used the connection)."""
        return self._client is not None

    @property
    def client(self) -> Client:
        """The client, built on first use."""
        if self._client is None:
            self._client = build_client(self.settings)
        return self._client

    def unavailable(self, exc: BaseException, what: str) -> ServiceUnavailableError:
        """Wrap a connection error with the URL and a hint."""
        return unavailable(self.settings, exc, what)

    async def ping(self, what: str) -> None:
        """PING the server; raise ServiceUnavailableError saying what to fix."""
        try:
            await self.client.ping()
        except CONNECTION_ERRORS as exc:
            raise self.unavailable(exc, what) from exc
        except rexc.ResponseError as exc:  # e.g. NOAUTH, or a wrong database index
            raise self.unavailable(exc, what) from exc

    async def blocking_conn(self, key: str) -> BlockingConn:
        """A dedicated connection to the node holding ``key``."""
        client = self.client
        if isinstance(client, RedisCluster):
            if not self._cluster_ready:
                await client.initialize()
                self._cluster_ready = True
            node = client.get_node_from_key(key)
            if node is None:
                raise rexc.ClusterDownError(f"no cluster node serves the slot of {key!r}")
            conn = node.acquire_connection()

            async def release_node() -> None:
                node.release(conn)

            return BlockingConn(conn, release_node, node)
        pool = client.connection_pool
        pconn = await pool.get_connection()  # type: ignore[no-untyped-call]

        async def release_pool() -> None:
            await pool.release(pconn)

        return BlockingConn(pconn, release_pool)

    async def unblock(self, blocking: BlockingConn, client_id: int) -> None:
        """End another connection's blocking command now (it replies as if timed out)."""
        client = self.client
        if isinstance(client, RedisCluster):
            await client.execute_command("CLIENT", "UNBLOCK", client_id, target_nodes=blocking.node)
        else:
            await client.execute_command("CLIENT", "UNBLOCK", client_id)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Close the client and its connections."""
        lanes, self._lanes = self._lanes, None
        if lanes is not None:
            await lanes.close()
        client, self._client = self._client, self._external
        if client is self._external:
            return  # the application's own client: it closes it
        self._cluster_ready = False
        if isinstance(client, aioredis.Redis):
            # The client was built on a pool we made; redis-py leaves a pool passed in
            # explicitly open unless told, which leaked one connection per close.
            await client.aclose(close_connection_pool=True)
        elif client is not None:
            await client.aclose()
