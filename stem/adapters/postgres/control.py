"""Postgres control channel (``stem_control``, migration 8: an append-only log read by
position, NOTIFYed on insert) and heartbeat store (``stem_workers``).

A publish is one statement that inserts the message and ``pg_notify``s the schema's
control channel; readers wait for that notification (or poll every
:data:`FALLBACK_POLL` seconds while LISTEN is down). Sequence values may commit out of
order, so a reader looks :data:`LOOKBACK` ids behind its position and skips the ids it
has already seen. Messages older than :data:`KEEP_SECONDS` are deleted now and then.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque

from stem._aio import wait_event

from ._pool import Connector, ListenHub

FALLBACK_POLL = 0.5
KEEP_SECONDS = 300.0
LOOKBACK = 64
_SEEN = 1024


class PostgresControlChannel:
    """:class:`stem.ports.ControlChannel` on a Postgres schema."""

    def __init__(self, connector: Connector, hub: ListenHub) -> None:
        self._db = connector
        schema = connector.settings.quoted_schema
        self._chan = connector.settings.channel("control")
        self._publish = (f"WITH m AS (INSERT INTO {schema}.stem_control (body) VALUES ($1) "
                         f"RETURNING id) SELECT pg_notify('{self._chan}', '') FROM m")
        self._trim = (f"DELETE FROM {schema}.stem_control "
                      f"WHERE created_at < now() - interval '{int(KEEP_SECONDS)} seconds'")
        self._select = (f"SELECT id, body FROM {schema}.stem_control WHERE id > $1 "
                        "ORDER BY id LIMIT 500")
        self._last = f"SELECT coalesce(max(id), 0) FROM {schema}.stem_control"
        self._events: set[asyncio.Event] = set()
        self._listener = hub.channel(self._chan, self._wake, self._wake_all)
        #: Per reader (the token in its position): the ids it has seen lately.
        self._readers: dict[str, tuple[deque[int], set[int], int]] = {}
        self._next_trim = 0.0

    def __repr__(self) -> str:
        return f"PostgresControlChannel({self._db.settings.display!r})"

    def _wake(self, _payload: str = "") -> None:
        for e in list(self._events):
            e.set()

    def _wake_all(self) -> None:
        self._wake()

    async def position(self) -> str:
        """``<reader token>:<highest id>``: the token keys this reader's seen ids."""
        last = await self._db.run(lambda c: c.fetchval(self._last))
        token = uuid.uuid4().hex[:12]
        self._readers[token] = (deque(maxlen=_SEEN), set(), int(last))
        while len(self._readers) > 256:  # readers that went away
            self._readers.pop(next(iter(self._readers)))
        return f"{token}:{last}"

    async def publish(self, message: bytes) -> None:
        await self._db.run(lambda c: c.execute(self._publish, message))
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + 60
            await self._db.run(lambda c: c.execute(self._trim))

    async def read(self, after: str, timeout: float) -> tuple[str, list[bytes]]:
        token, _, pos_text = after.rpartition(":")
        start = int(pos_text)
        seen, seen_set, floor = self._readers.setdefault(
            token, (deque(maxlen=_SEEN), set(), start))
        deadline = time.monotonic() + timeout
        event = asyncio.Event()
        self._events.add(event)
        try:
            while True:
                listening = await self._listener.ensure()
                event.clear()
                rows = await self._db.run(lambda c: c.fetch(self._select, start - LOOKBACK))
                msgs: list[bytes] = []
                top = start
                for r in rows:
                    mid: int = r["id"]
                    top = max(top, mid)
                    if mid in seen_set or mid <= floor:
                        continue  # seen, or there before this reader started
                    if len(seen) == seen.maxlen:
                        seen_set.discard(seen[0])
                    seen.append(mid)
                    seen_set.add(mid)
                    msgs.append(bytes(r["body"]))
                if msgs:
                    return f"{token}:{top}", msgs
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"{token}:{top}", []
                step = left if listening else min(left, FALLBACK_POLL)
                await wait_event(event, step)
        finally:
            self._events.discard(event)

    async def close(self) -> None:
        await self._listener.close()


class PostgresHeartbeatStore:
    """:class:`stem.ports.HeartbeatStore` on a Postgres schema."""

    def __init__(self, connector: Connector) -> None:
        self._db = connector
        s = connector.settings.quoted_schema
        self._put = (f"INSERT INTO {s}.stem_workers (worker_id, body, expires_at) "
                     "VALUES ($1, $2, now() + make_interval(secs => $3)) "
                     "ON CONFLICT (worker_id) DO UPDATE SET body = EXCLUDED.body, "
                     "expires_at = EXCLUDED.expires_at")
        self._purge = f"DELETE FROM {s}.stem_workers WHERE expires_at <= now()"
        self._current = (f"SELECT body FROM {s}.stem_workers WHERE expires_at > now() "
                         "ORDER BY worker_id")
        self._remove = f"DELETE FROM {s}.stem_workers WHERE worker_id = $1"

    async def put(self, worker_id: str, heartbeat: bytes, ttl: float) -> None:
        async def op(c: object) -> None:
            await c.execute(self._put, worker_id, heartbeat, float(ttl))  # type: ignore[attr-defined]
            await c.execute(self._purge)  # type: ignore[attr-defined]

        await self._db.run(op)

    async def current(self) -> list[bytes]:
        rows = await self._db.run(lambda c: c.fetch(self._current))
        return [bytes(r["body"]) for r in rows]

    async def remove(self, worker_id: str) -> None:
        await self._db.run(lambda c: c.execute(self._remove, worker_id))

    async def close(self) -> None:
        """The pool is the store's."""
