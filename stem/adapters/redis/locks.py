"""Redis lock store: one string key per held lock, ``<ns>:lock:<key>``, holding the
owner, with the lease as its expiry (``PX``).

Acquire is ``SET NX PX`` (or, for the holder itself, a new expiry), renew and release
compare the owner and then ``PEXPIRE``/``DEL``: each one Lua script on one key, so it
is atomic and Redis Cluster-safe. Expiry is the server's clock.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import AsyncScript

from stem.adapters._beat import check_ttl
from stem.adapters._shared import check_namespace

from . import scripts
from ._connection import CONNECTION_ERRORS, RedisConnector, RedisSettings


def _ms(ttl: float) -> int:
    return max(1, round(check_ttl(ttl) * 1000))


class RedisLockStore:
    """A :class:`stem.ports.LockStore` on Redis keys with expiries."""

    def __init__(self, settings: RedisSettings, *, namespace: str = "stem",
                 connector: RedisConnector | None = None) -> None:
        self.namespace = check_namespace(namespace)
        self._owns_conn = connector is None
        self._conn = RedisConnector(settings) if connector is None else connector
        self._prefix = f"{namespace}:lock:"
        self._scripts: tuple[Any, dict[str, AsyncScript]] | None = None

    def __repr__(self) -> str:
        return f"RedisLockStore({self._conn.settings.safe_url!r}, namespace={self.namespace!r})"

    def key(self, key: str) -> str:
        """The Redis key of lock ``key``."""
        return self._prefix + key

    async def _call(self, name: str, key: str, *args: Any) -> Any:
        client = self._conn.client
        if self._scripts is None or self._scripts[0] is not client:
            # register_script only hashes the source; EVALSHA loads it on NOSCRIPT.
            self._scripts = (client, {
                "acquire": client.register_script(scripts.LOCK_ACQUIRE),
                "renew": client.register_script(scripts.LOCK_RENEW),
                "release": client.register_script(scripts.LOCK_RELEASE),
            })
        script: Any = self._scripts[1][name]
        try:
            return await script([self.key(key)], list(args))
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, f"Stem lock store {name}") from exc

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """``SET NX PX``, or a new expiry when ``owner`` holds it already."""
        return bool(await self._call("acquire", key, owner, _ms(ttl)))

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        """``PEXPIRE`` if ``owner`` holds it."""
        return bool(await self._call("renew", key, owner, _ms(ttl)))

    async def release(self, key: str, owner: str) -> bool:
        """``DEL`` if ``owner`` holds it."""
        return bool(await self._call("release", key, owner))

    async def owner_of(self, key: str) -> str | None:
        """``GET`` (an expired key is gone)."""
        try:
            raw = await self._conn.client.get(self.key(key))
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem lock store owner_of") from exc
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    async def close(self) -> None:
        """Close the client if this lock store owns it (a store's closes with it)."""
        self._scripts = None
        if self._owns_conn:
            await self._conn.close()
