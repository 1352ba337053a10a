"""The Redis revoke store: the Dart Stem's hash ``<ns>:control:revokes`` (field = task
id, value = entry JSON), plus ``<ns>:control:revokes:version``, the highest version
written.

An upsert is one Lua script on the hash that keeps a stored entry whose version is
greater or equal (atomic), then one on the version key that raises it. A reader asks
for the version key first, so "changed since" costs one ``GET`` while nothing
changed; each script touches one key, so this is Redis Cluster-safe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from stem._time import utcnow
from stem.revoke import RevokeEntry

from ._connection import CONNECTION_ERRORS, RedisConnector

#: ARGV: taskId, version, json, ... . Keeps an entry whose version is >= the new one.
UPSERT = """
local n = 0
for i = 1, #ARGV, 3 do
  local keep = false
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local ok, d = pcall(cjson.decode, cur)
    if ok and type(d) == 'table' and tonumber(d['version']) ~= nil
       and tonumber(d['version']) >= tonumber(ARGV[i + 1]) then
      keep = true
    end
  end
  if not keep then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    n = n + 1
  end
end
return n
"""

#: ARGV: a version. Raises the stored highest version to it.
RAISE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

#: ARGV: taskId, version, ... . Deletes each entry still at that version.
PRUNE = """
local n = 0
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local ok, d = pcall(cjson.decode, cur)
    if ok and type(d) == 'table' and tonumber(d['version']) == tonumber(ARGV[i + 1]) then
      redis.call('HDEL', KEYS[1], ARGV[i])
      n = n + 1
    end
  end
end
return n
"""


class RedisRevokeStore:
    """:class:`stem.ports.RevokeStore` on Redis."""

    def __init__(self, connector: RedisConnector, *, namespace: str = "stem") -> None:
        self._conn = connector
        self.namespace = namespace
        self.key = f"{namespace}:control:revokes"
        self.version_key = f"{self.key}:version"
        self._scripts: tuple[Any, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"RedisRevokeStore({self._conn.settings.safe_url!r})"

    def _script(self, name: str) -> Any:
        client = self._conn.client
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, {"upsert": client.register_script(UPSERT),
                                      "raise": client.register_script(RAISE),
                                      "prune": client.register_script(PRUNE)})
        return self._scripts[1][name]

    async def upsert_many(self, entries: Sequence[RevokeEntry]) -> None:
        if not entries:
            return
        args: list[Any] = []
        for e in entries:
            args += [e.task_id, e.version,
                     json.dumps(e.with_namespace(self.namespace).to_json())]
        try:
            await self._script("upsert")(keys=[self.key], args=args)
            await self._script("raise")(keys=[self.version_key],
                                        args=[max(e.version for e in entries)])
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem revoke store write") from exc

    async def _all(self) -> list[RevokeEntry]:
        try:
            raw = await self._conn.client.hgetall(self.key)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem revoke store read") from exc
        out = []
        for value in raw.values():
            try:
                out.append(RevokeEntry.from_json(json.loads(value)))
            except ValueError:
                continue  # not an entry: left for whoever wrote it
        out.sort(key=lambda e: e.version)
        return out

    async def entries(self) -> list[RevokeEntry]:
        return await self._all()

    async def changed_since(self, version: int) -> list[RevokeEntry]:
        try:
            latest = await self._conn.client.get(self.version_key)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem revoke store read") from exc
        if latest is not None and int(latest) <= version:
            return []
        return [e for e in await self._all() if e.version > version]

    async def prune_expired(self, now: datetime | None = None) -> int:
        at = now or utcnow()
        args: list[Any] = []
        for e in await self._all():
            if e.is_expired(at):
                args += [e.task_id, e.version]
        if not args:
            return 0
        try:
            return int(await self._script("prune")(keys=[self.key], args=args))
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem revoke store prune") from exc

    async def close(self) -> None:
        """The client is the store's: forget the script handles only."""
        self._scripts = None
