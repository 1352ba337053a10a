"""Redis schedule store, in the Dart Stem's Redis layout.

Keys (``P`` is ``<ns>:schedule``, or ``{<ns>:schedule}`` on Redis Cluster so that every
schedule key has one hash tag and each script runs in one slot):

- ``P:index`` ZSET of every entry id, score = ``nextRunAt`` in epoch ms (``+inf`` for
  a disabled entry or one without a next run, so :meth:`RedisScheduleStore.due` is one
  range read);
- ``P:<id>`` HASH of the entry, the Dart store's fields (``taskName``, ``queue``,
  ``spec``/``args``/``kwargs``/``meta`` as JSON, ``enabled`` ``"true"``/``"false"``,
  ISO times, numbers as text, ``version``; ``""`` is null) plus ``id``, ``createdAt``,
  ``updatedAt`` and ``extra`` (JSON of keys this version does not know);
- ``P:<id>:history`` STREAM of runs (``scheduledAt``, ``executedAt``, ``success``,
  ``durationMs``, ``error``), trimmed to ``history_max`` entries by each ``XADD``
  (exact ``MAXLEN``, so the bound holds however small it is).

``<id>`` in a key has ``%``, ``:``, ``{`` and ``}`` percent-encoded (and the id
``index`` is written ``%69ndex``), so no id's keys can collide with another's or with
the index; the index and the ``id`` field keep the id as it is. Upsert, mark_run and
remove are Lua scripts (version compare, write, index, history together: atomic).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from redis.commands.core import AsyncScript

from stem._time import from_iso, to_iso, utcnow
from stem.adapters._beat import (
    check_batch,
    check_history_max,
    check_limit,
    drift_ms,
    epoch_ms,
    ms_time,
    stored_entry,
)
from stem.adapters._shared import check_namespace
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.errors import ScheduleConflictError
from stem.ports import DEFAULT_SCHEDULE_HISTORY

from . import scripts
from ._connection import CONNECTION_ERRORS, RedisConnector, RedisSettings
from .broker import key_part

#: The Dart JSON keys of an entry (every key ``ScheduleEntry.to_dict`` writes).
_KNOWN = frozenset(ScheduleEntry(id="", task="", spec={}, kwargs={"k": 1}).to_dict())
#: Dart JSON keys stored as JSON text in the hash.
_JSON_FIELDS = frozenset({"spec", "args", "kwargs", "meta"})
#: Dart JSON keys holding whole numbers.
_INT_FIELDS = frozenset({"jitterMs", "lastJitterMs", "totalRunCount", "driftMs", "version"})
#: Fields the scripts write themselves.
_SCRIPT_FIELDS = frozenset({"version", "createdAt", "updatedAt"})
#: ZSET score of an entry that is never due.
NEVER = "+inf"
#: Ids read per round trip while looking for due entries.
PAGE = 100
#: Most runs one ``mark_runs`` script records (a larger batch takes several calls), so
#: that one script does not hold up the server for long.
MARK_RUNS_CHUNK = 1000


def id_part(entry_id: str) -> str:
    """``entry_id`` as written inside its keys (reversible, never ``index``)."""
    part = key_part(entry_id)
    return "%69ndex" if part == "index" else part


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return orjson.dumps(value).decode()


def entry_fields(entry: ScheduleEntry) -> list[str]:
    """The hash fields of ``entry`` but version and the two write times, flat
    (field, value, ...)."""
    data = entry.to_dict()
    data.setdefault("kwargs", {})
    out: list[str] = []
    for key in _KNOWN - _SCRIPT_FIELDS:
        value = data.get(key)
        out += [key, orjson.dumps(value).decode() if key in _JSON_FIELDS else _text(value)]
    out += ["extra", orjson.dumps(entry.extra).decode() if entry.extra else ""]
    return out


def decode_entry(entry_id: str, raw: dict[Any, Any] | list[Any]) -> ScheduleEntry:
    """A hash read back (HGETALL as a dict, or a script's flat list) as an entry."""
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    data: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        text = v.decode() if isinstance(v, bytes) else str(v)
        if key == "extra":
            if text:
                extra.update(orjson.loads(text))
        elif key not in _KNOWN:
            extra[key] = text  # a field another writer added: kept, as text
        elif text == "":
            continue  # null
        elif key in _JSON_FIELDS:
            data[key] = orjson.loads(text)
        elif key == "enabled":
            data[key] = text != "false"
        elif key in _INT_FIELDS:
            data[key] = int(text)
        else:
            data[key] = text
    data.setdefault("id", entry_id)
    data.update((k, v) for k, v in extra.items() if k not in data)
    return ScheduleEntry.from_dict(data)


def _score(entry: ScheduleEntry) -> str:
    if not entry.enabled or entry.next_run_at is None:
        return NEVER
    return str(epoch_ms(entry.next_run_at))


class RedisScheduleStore:
    """A :class:`stem.ports.ScheduleStore` on Redis (layout in the module docstring)."""

    def __init__(self, settings: RedisSettings, *, namespace: str = "stem",
                 connector: RedisConnector | None = None,
                 history_max: int = DEFAULT_SCHEDULE_HISTORY) -> None:
        self.namespace = check_namespace(namespace)
        self.history_max = check_history_max(history_max)
        self._owns_conn = connector is None
        self._conn = RedisConnector(settings) if connector is None else connector
        self._scripts: tuple[Any, dict[str, AsyncScript]] | None = None

    def __repr__(self) -> str:
        return (f"RedisScheduleStore({self._conn.settings.safe_url!r}, "
                f"namespace={self.namespace!r})")

    # -- keys ----------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """``<ns>:schedule``, or ``{<ns>:schedule}`` on Redis Cluster (one slot)."""
        base = f"{self.namespace}:schedule"
        return "{" + base + "}" if self._conn.is_cluster else base

    def index_key(self) -> str:
        """The ZSET of entry ids by next run."""
        return f"{self.prefix}:index"

    def entry_key(self, entry_id: str) -> str:
        """The hash of one entry."""
        return f"{self.prefix}:{id_part(entry_id)}"

    def history_key(self, entry_id: str) -> str:
        """The run-history stream of one entry."""
        return f"{self.prefix}:{id_part(entry_id)}:history"

    def _keys(self, entry_id: str) -> list[str]:
        return [self.entry_key(entry_id), self.index_key(), self.history_key(entry_id)]

    # -- plumbing ------------------------------------------------------------------

    async def _script(self, name: str, entry_id: str | list[str], args: list[Any],
                      what: str) -> Any:
        client = self._conn.client
        if self._scripts is None or self._scripts[0] is not client:
            # register_script only hashes the source; EVALSHA loads it on NOSCRIPT.
            self._scripts = (client, {
                "upsert": client.register_script(scripts.SCHEDULE_UPSERT),
                "mark_run": client.register_script(scripts.SCHEDULE_MARK_RUN),
                "mark_runs": client.register_script(scripts.SCHEDULE_MARK_RUNS),
                "remove": client.register_script(scripts.SCHEDULE_REMOVE),
            })
        script: Any = self._scripts[1][name]
        try:
            keys = (self._keys(entry_id) if isinstance(entry_id, str)
                    else [k for i in entry_id for k in self._keys(i)])
            return await script(keys, args)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, f"Stem schedule store {what}") from exc

    async def _read_many(self, ids: list[str]) -> list[ScheduleEntry]:
        """The entries of ``ids`` that exist, in that order (one pipelined round trip)."""
        if not ids:
            return []
        client = self._conn.client
        try:
            pipe: Any = client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.hgetall(self.entry_key(entry_id))
            hashes = await pipe.execute()
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, "Stem schedule store read") from exc
        return [decode_entry(i, h) for i, h in zip(ids, hashes, strict=True) if h]

    async def _command(self, what: str, *args: Any) -> Any:
        try:
            return await self._conn.client.execute_command(*args)
        except CONNECTION_ERRORS as exc:
            raise self._conn.unavailable(exc, f"Stem schedule store {what}") from exc

    # -- the ScheduleStore protocol --------------------------------------------------

    async def get(self, entry_id: str) -> ScheduleEntry | None:
        """One entry (``HGETALL``), or None."""
        found = await self._read_many([entry_id])
        return found[0] if found else None

    async def entries(self) -> list[ScheduleEntry]:
        """Every entry in the index, ordered by id."""
        ids = await self._command("entries", "ZRANGE", self.index_key(), 0, -1)
        return await self._read_many(sorted(i.decode() for i in ids))

    async def upsert(self, entry: ScheduleEntry, *, expected_version: int | None = None
                     ) -> ScheduleEntry:
        """The version check, the write and the index update in one script."""
        now = ms_time(utcnow())
        assert now is not None
        fallback = entry.created_at or now
        reply = await self._script("upsert", entry.id, [
            "" if expected_version is None else int(expected_version), entry.id,
            _score(entry), to_iso(fallback), to_iso(now), *entry_fields(entry),
        ], "upsert")
        if int(reply[0]) != 1:
            actual = int(reply[1])
            raise ScheduleConflictError(entry.id, expected_version, None if actual < 0 else actual)
        created = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
        return stored_entry(entry, version=int(reply[1]), created_at=from_iso(created),
                            updated_at=now)

    async def remove(self, entry_id: str) -> bool:
        """Delete the hash, the history stream and the index member in one script."""
        return bool(await self._script("remove", entry_id, [entry_id], "remove"))

    async def due(self, now: datetime, limit: int = 100) -> list[ScheduleEntry]:
        """Index members scored ``<= now`` (the caller's clock), soonest first; enabled
        entries only (an entry written disabled by another program is skipped)."""
        check_limit(limit)
        cutoff = epoch_ms(now)
        out: list[ScheduleEntry] = []
        offset = 0
        while len(out) < limit:
            page = max(limit - len(out), 1) if offset == 0 else PAGE
            ids = await self._command("due", "ZRANGEBYSCORE", self.index_key(), "-inf", cutoff,
                                      "LIMIT", offset, page)
            out += [e for e in await self._read_many([i.decode() for i in ids])
                    if e.enabled and e.next_run_at is not None
                    and epoch_ms(e.next_run_at) <= cutoff][: limit - len(out)]
            if len(ids) < page:
                break
            offset += len(ids)
        return out

    def _mark_args(self, item: MarkRun, updated_at: str) -> list[Any]:
        run, next_at = item.run, ms_time(item.next_run_at)
        return [int(item.expected_version), run.entry_id, to_iso(run.executed_at),
                "" if next_at is None else to_iso(next_at),
                NEVER if next_at is None else epoch_ms(next_at),
                int(item.disable), int(run.success), run.error or "", drift_ms(run),
                int(item.jitter_ms), updated_at, to_iso(run.scheduled_at),
                int(run.duration_ms), self.history_max]

    async def mark_run(self, run: ScheduleRun, *, expected_version: int,
                       next_run_at: datetime | None, jitter_ms: int = 0,
                       disable: bool = False) -> ScheduleEntry | None:
        """The version check, the entry update, the index and the history in one script."""
        item = MarkRun(run, expected_version, next_run_at, jitter_ms, disable)
        reply = await self._script("mark_run", run.entry_id,
                                   self._mark_args(item, to_iso(utcnow())), "mark_run")
        return None if not reply else decode_entry(run.entry_id, reply)

    async def mark_runs(self, runs: Sequence[MarkRun]) -> list[ScheduleEntry | None]:
        """Every run of the batch in one script call (per :data:`MARK_RUNS_CHUNK` runs):
        each entry checked and written as by :meth:`mark_run`."""
        batch = check_batch(runs)
        out: list[ScheduleEntry | None] = []
        now = to_iso(utcnow())
        for start in range(0, len(batch), MARK_RUNS_CHUNK):
            chunk = batch[start:start + MARK_RUNS_CHUNK]
            args = [a for item in chunk for a in self._mark_args(item, now)]
            replies = await self._script("mark_runs", [m.entry_id for m in chunk], args,
                                         "mark_runs")
            out += [decode_entry(m.entry_id, r) if isinstance(r, list) and r else None
                    for m, r in zip(chunk, replies, strict=True)]
        return out

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The newest ``limit`` entries of the history stream (``XREVRANGE``)."""
        if not check_limit(limit):
            return []
        rows = await self._command("history", "XREVRANGE", self.history_key(entry_id), "+", "-",
                                   "COUNT", limit)
        out: list[ScheduleRun] = []
        for _, fields in rows:
            pairs = (fields.items() if isinstance(fields, dict)
                     else zip(fields[::2], fields[1::2], strict=True))
            f = {k.decode(): v.decode() for k, v in pairs}
            out.append(ScheduleRun(
                entry_id, from_iso(f["scheduledAt"]), from_iso(f["executedAt"]),
                f.get("success") == "true", int(f.get("durationMs") or 0), f.get("error") or None))
        return out

    async def close(self) -> None:
        """Close the client if this schedule store owns it (a store's closes with it)."""
        self._scripts = None
        if self._owns_conn:
            await self._conn.close()
