"""Redis group store: a hash per group and a hash of its members, changed by Lua scripts.

Keys are ``<namespace>:group:{<id>}`` (expected, counters, claimed, meta, created) and
``<namespace>:group:{<id>}:members`` (member index -> outcome JSON). The ``{<id>}``
hash tag keeps both in one cluster slot, so each script is atomic on a cluster too.
Recording a member is ``HSETNX`` plus counters in one script (the first record of an
index wins); the chord claim checks completion and sets ``claimed`` in one script.
Both keys expire with the group's TTL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from redis.commands.core import AsyncScript

from stem._time import now_epoch
from stem.adapters._shared import check_namespace
from stem.groups import GroupMember, GroupProgress, GroupRecord, dump_meta

from ._connection import CONNECTION_ERRORS, RedisConnector

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'expected', ARGV[1], 'completed', 0, 'failed', 0,
           'claimed', 0, 'meta', ARGV[2], 'created', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

ADD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local added = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if added == 1 then
  redis.call('HINCRBY', KEYS[1], 'completed', 1)
  if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'failed', 1) end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
local v = redis.call('HMGET', KEYS[1], 'expected', 'completed', 'failed')
return {tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), added}
"""

CLAIM = """
local v = redis.call('HMGET', KEYS[1], 'expected', 'completed', 'failed', 'claimed')
if not v[1] then return 0 end
if v[4] == '1' or tonumber(v[3]) > 0 or tonumber(v[2]) < tonumber(v[1]) then return 0 end
redis.call('HSET', KEYS[1], 'claimed', 1)
return 1
"""


class RedisGroupStore:
    """A :class:`stem.ports.GroupStore` on Redis (see the module docstring)."""

    def __init__(self, connector: RedisConnector, *, namespace: str = "stem") -> None:
        self.namespace = check_namespace(namespace)
        self._conn = connector
        self._scripts: dict[str, AsyncScript] = {}

    def __repr__(self) -> str:
        return f"RedisGroupStore({self._conn.settings.safe_url!r}, namespace={self.namespace!r})"

    def keys(self, group_id: str) -> list[str]:
        """The record and members keys of ``group_id``."""
        record = f"{self.namespace}:group:{{{group_id}}}"
        return [record, record + ":members"]

    async def _run(self, name: str, source: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._conn.client.register_script(source)
        try:
            return await script(keys, args)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, f"Stem group store {name}") from exc

    async def create(self, group_id: str, expected: int, meta: dict[str, Any],
                     ttl: float) -> bool:
        """Create the record unless one exists."""
        ms = max(1, round(ttl * 1000))
        done = await self._run("create", CREATE, self.keys(group_id),
                               [expected, dump_meta(meta), ms, round(now_epoch() * 1000)])
        return int(done) == 1

    async def add_result(self, group_id: str, member: GroupMember) -> GroupProgress | None:
        """Record the member once (``HSETNX``) and return the counters."""
        reply = await self._run("add", ADD, self.keys(group_id), [
            member.index, member.to_json(), int(member.state.value != "succeeded")])
        if reply is None:
            return None
        expected, completed, failed, added = (int(x) for x in reply)
        return GroupProgress(expected, completed, failed, added == 1)

    async def claim_callback(self, group_id: str) -> bool:
        """True for the one caller that found the group complete and unclaimed."""
        return int(await self._run("claim", CLAIM, self.keys(group_id)[:1], [])) == 1

    async def get(self, group_id: str) -> GroupRecord | None:
        """The record and its members in index order."""
        record_key, members_key = self.keys(group_id)
        client = self._conn.client
        try:
            pipe = client.pipeline(transaction=True)
            pipe.hgetall(record_key)
            pipe.hgetall(members_key)
            pipe.pttl(record_key)
            fields, members, pttl = await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem group store get") from exc
        if not fields:
            return None
        f = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        created = datetime.fromtimestamp(int(f["created"]) / 1000, UTC)
        expires = (datetime.now(UTC) + timedelta(milliseconds=int(pttl))
                   if int(pttl) > 0 else None)
        ordered = sorted((GroupMember.from_json(v) for v in members.values()),
                         key=lambda m: m.index)
        return GroupRecord(group_id, int(f["expected"]), orjson.loads(f["meta"]), ordered,
                           int(f["completed"]), int(f["failed"]), f["claimed"] in (b"1", "1"),
                           created, expires)

    async def close(self) -> None:
        """Nothing of its own: the store's client closes with the store."""
