"""Redis control channel and heartbeat store.

The channel is one stream, ``<ns>:control:log`` (``XADD ... MAXLEN ~ 1000``): every
reader keeps its own position and ``XREAD BLOCK``s from it, so each message reaches
every live worker (real fan-out, no consumer group) and none published while a reader
was between two reads is lost. Heartbeats are one key per worker,
``{<ns>:workers}:hb:<id>`` with the heartbeat's TTL, and the set ``{<ns>:workers}:ids``
naming them (one hash tag: Redis Cluster-safe).
"""

from __future__ import annotations

from typing import Any

from ._connection import CONNECTION_ERRORS, RedisConnector

#: Messages the stream keeps (about).
KEEP = 1000


class RedisControlChannel:
    """:class:`stem.ports.ControlChannel` on a Redis stream."""

    def __init__(self, connector: RedisConnector, *, namespace: str = "stem") -> None:
        self._conn = connector
        self.key = f"{namespace}:control:log"

    def __repr__(self) -> str:
        return f"RedisControlChannel({self._conn.settings.safe_url!r})"

    def _unavailable(self, exc: BaseException, what: str) -> Exception:
        return self._conn.unavailable(exc, f"Stem control channel {what}")

    async def position(self) -> str:
        try:
            last = await self._conn.client.xrevrange(self.key, "+", "-", count=1)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, "read") from exc
        return _text(last[0][0]) if last else "0-0"

    async def publish(self, message: bytes) -> None:
        try:
            await self._conn.client.xadd(self.key, {"m": message}, maxlen=KEEP,
                                         approximate=True)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, "publish") from exc

    async def read(self, after: str, timeout: float) -> tuple[str, list[bytes]]:
        block = max(1, round(timeout * 1000)) if timeout > 0 else None
        try:
            got: Any = await self._conn.client.xread({self.key: after}, count=500, block=block)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, "read") from exc
        if not got:
            return after, []
        entries = got[0][1] if isinstance(got, list) else next(iter(got.values()))[0]
        msgs = [fields.get(b"m", fields.get("m", b"")) for _, fields in entries]
        return _text(entries[-1][0]), [m if isinstance(m, bytes) else m.encode() for m in msgs]

    async def close(self) -> None:
        """The client is the store's."""


class RedisHeartbeatStore:
    """:class:`stem.ports.HeartbeatStore` on Redis keys with expiries."""

    def __init__(self, connector: RedisConnector, *, namespace: str = "stem") -> None:
        self._conn = connector
        tag = "{" + namespace + ":workers}"
        self._prefix = f"{tag}:hb:"
        self._ids = f"{tag}:ids"

    async def put(self, worker_id: str, heartbeat: bytes, ttl: float) -> None:
        try:
            pipe = self._conn.client.pipeline(transaction=False)
            pipe.set(self._prefix + worker_id, heartbeat, px=max(1, round(ttl * 1000)))
            pipe.sadd(self._ids, worker_id)
            await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem heartbeat write") from exc

    async def current(self) -> list[bytes]:
        client = self._conn.client
        try:
            ids = sorted(_text(i) for i in await client.smembers(self._ids))
            if not ids:
                return []
            values = await client.mget([self._prefix + i for i in ids])
            gone = [i for i, v in zip(ids, values, strict=True) if v is None]
            if gone:
                await client.srem(self._ids, *gone)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem heartbeat read") from exc
        return [v if isinstance(v, bytes) else v.encode() for v in values if v is not None]

    async def remove(self, worker_id: str) -> None:
        try:
            pipe = self._conn.client.pipeline(transaction=False)
            pipe.delete(self._prefix + worker_id)
            pipe.srem(self._ids, worker_id)
            await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem heartbeat write") from exc

    async def close(self) -> None:
        """The client is the store's."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
