"""A schedule store in one JSON (or YAML) file: the default of ``stem beat`` and
``stem schedule`` when no schedule-store URL is set.

Every write reads the file, changes it and replaces it atomically (a temporary file,
then ``os.replace``) while holding an OS lock on a ``<file>.lock`` beside it
(``fcntl.flock``), so processes sharing the file never corrupt it or lose a write. A
file store has no locks for entries: run one beat per file store (see docs/beat.md).

The file is read in any of the Dart Stem's forms (:func:`entries_from_document`): a
list of entries, ``{"schedules": [...]}``, or a map keyed by id; with the aliases
``name`` for ``id``, ``task`` for ``taskName``, ``schedule`` for ``spec``, ``jitter:
"5s"`` for ``jitterMs``, ``options: {runOnce}``. It is written as ``{"schedules":
[...], "history": {id: [runs]}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from stem._extras import require
from stem._time import from_iso, to_iso, utcnow
from stem.adapters._beat import (
    check_batch,
    check_history_max,
    check_limit,
    is_due,
    ms_time,
    run_applied,
    upserted,
)
from stem.beat.entry import MarkRun, ScheduleEntry, ScheduleRun
from stem.beat.specs import normalize_spec, parse_duration
from stem.errors import ConfigurationError

__all__ = ["DEFAULT_SCHEDULE_FILE", "FileScheduleStore", "entries_from_document",
           "entry_from_file", "load_document"]

T = TypeVar("T")
#: The file used when neither ``STEM_SCHEDULE_STORE_URL`` nor ``STEM_SCHEDULE_FILE`` is set.
DEFAULT_SCHEDULE_FILE = ".stem/schedules.json"
#: Runs kept per entry in a file unless built with another bound (smaller than other
#: stores' default: a file is rewritten whole on every run).
FILE_HISTORY_MAX = 50
_YAML_SUFFIXES = (".yaml", ".yml")


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in _YAML_SUFFIXES


def load_document(text: str | bytes, *, yaml: bool = False, source: str = "schedule file"
                  ) -> Any:
    """Parse a schedule file's text (JSON, or YAML with ``yaml=True``)."""
    try:
        if yaml:
            module = require("yaml")
            return module.safe_load(text)
        return orjson.loads(text) if text.strip() else None
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"{source}: cannot parse it: {exc}") from None


def entries_from_document(document: Any, *, source: str = "schedule file",
                          strict: bool = True) -> list[ScheduleEntry]:
    """The entries of a schedule document in any accepted form (see the module doc).

    Specs are checked and stored in their JSON form; ConfigurationError names the file,
    the entry and what is wrong. With ``strict=False`` (the store reading its own file)
    a spec already in JSON form is kept as it is, unchecked, and so is the time zone: a
    store returns what was written (keys of a spec it does not know included), and an
    entry whose spec no longer parses is the beat's to report, not a file that cannot be
    read.
    """
    if document is None:
        return []
    if isinstance(document, dict) and "schedules" in document:
        document = document["schedules"]
    if isinstance(document, dict):  # a map keyed by id
        items: list[tuple[str | None, Any]] = list(document.items())
    elif isinstance(document, list):
        items = [(None, item) for item in document]
    else:
        raise ConfigurationError(f"{source}: expected a list of entries, "
                                 f"{{\"schedules\": [...]}} or a map keyed by id, "
                                 f"got {type(document).__name__}")
    out = []
    seen: set[str] = set()
    for key, item in items:
        entry = entry_from_file(item, entry_id=key, source=source, strict=strict)
        if entry.id in seen:
            raise ConfigurationError(f"{source}: entry {entry.id!r} appears twice")
        seen.add(entry.id)
        out.append(entry)
    return out


def entry_from_file(data: Any, *, entry_id: str | None = None,
                    source: str = "schedule file", strict: bool = True) -> ScheduleEntry:
    """One entry from a schedule file (Dart's aliases accepted; ``strict``: see
    :func:`entries_from_document`)."""
    if not isinstance(data, dict):
        raise ConfigurationError(f"{source}: an entry must be an object, got {data!r}")
    data = dict(data)
    ident = data.get("id") or data.pop("name", None) or entry_id
    if not isinstance(ident, str) or not ident:
        raise ConfigurationError(f"{source}: an entry lacks 'id' (or 'name'): {data!r}")
    where = f"{source}: entry {ident!r}"
    data["id"] = ident
    if "taskName" not in data and "task" in data:
        data["taskName"] = data.pop("task")
    if "spec" not in data and "schedule" in data:
        data["spec"] = data.pop("schedule")
    if "jitter" in data and "jitterMs" not in data:
        data["jitterMs"] = parse_duration(data.pop("jitter"), what=f"{where}: jitter")
    options = data.pop("options", None)
    if not isinstance(data.get("taskName"), str) or not data["taskName"]:
        raise ConfigurationError(f"{where}: lacks 'task' (or 'taskName')")
    if "spec" not in data:
        raise ConfigurationError(f"{where}: lacks 'spec' (or 'schedule')")
    if strict or not isinstance(data["spec"], dict):
        try:
            data["spec"] = normalize_spec(data["spec"], entry_id=ident)
        except ConfigurationError as exc:  # it names the entry; say which file too
            raise ConfigurationError(f"{source}: {exc}") from None
    if (isinstance(options, dict) and "runOnce" in options
            and data["spec"].get("kind") == "clocked"):
        data["spec"]["runOnce"] = bool(options["runOnce"])
    elif options is not None:
        data["options"] = options  # kept as an unknown key, written back unchanged
    for key, kind in (("args", dict), ("kwargs", dict), ("meta", dict), ("enabled", bool),
                      ("queue", str), ("timezone", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise ConfigurationError(f"{where}: {key!r} must be a {kind.__name__}, "
                                     f"got {data[key]!r}")
    for key in ("expireAt", "lastRunAt", "nextRunAt"):  # YAML gives datetimes
        if isinstance(data.get(key), datetime):
            data[key] = to_iso(data[key])
    try:
        entry = ScheduleEntry.from_dict(data)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    if strict and entry.timezone is not None:
        from stem.beat.specs import zone
        try:
            zone(entry.timezone)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
    return entry


class FileScheduleStore:
    """A :class:`stem.ports.ScheduleStore` in one file (JSON; YAML for ``.yaml``/``.yml``
    when PyYAML is installed). Safe for several processes on one host.

    The port's rules (versions, times to the millisecond, what ``mark_run`` writes) are
    :mod:`stem.adapters._beat`'s, as in every other store.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 history_max: int = FILE_HISTORY_MAX) -> None:
        self.path = Path(path or os.environ.get("STEM_SCHEDULE_FILE") or DEFAULT_SCHEDULE_FILE)
        self.history_max = check_history_max(history_max)
        self.url = f"file://{self.path}"

    def __repr__(self) -> str:
        return f"FileScheduleStore({str(self.path)!r})"

    # -- file I/O (in a thread: flock and disk writes block) ----------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as handle:
            if sys.platform != "win32":
                import fcntl
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if sys.platform != "win32":
                    import fcntl
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, ScheduleEntry], dict[str, list[dict[str, Any]]]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, {}
        document = load_document(raw, yaml=_is_yaml(self.path), source=str(self.path))
        history = document.get("history", {}) if isinstance(document, dict) else {}
        entries = entries_from_document(document, source=str(self.path), strict=False)
        return {e.id: e for e in entries}, history if isinstance(history, dict) else {}

    def _write(self, entries: dict[str, ScheduleEntry],
               history: dict[str, list[dict[str, Any]]]) -> None:
        document = {"schedules": [entries[k].to_dict() for k in sorted(entries)],
                    "history": {k: v for k, v in sorted(history.items()) if k in entries}}
        if _is_yaml(self.path):
            text = require("yaml").safe_dump(document, sort_keys=False).encode()
        else:
            text = orjson.dumps(document, option=orjson.OPT_INDENT_2)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp",
                                   dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _change(self, change: Callable[[dict[str, ScheduleEntry],
                                        dict[str, list[dict[str, Any]]]], T]) -> T:
        with self._locked():
            entries, history = self._read()
            result = change(entries, history)
            self._write(entries, history)
            return result

    def _snapshot(self) -> dict[str, ScheduleEntry]:
        with self._locked():
            return self._read()[0]

    # -- the port -----------------------------------------------------------------------

    async def get(self, entry_id: str) -> ScheduleEntry | None:
        """One entry, or None."""
        return (await asyncio.to_thread(self._snapshot)).get(entry_id)

    async def entries(self) -> list[ScheduleEntry]:
        """Every entry, ordered by id."""
        found = await asyncio.to_thread(self._snapshot)
        return [found[k] for k in sorted(found)]

    async def upsert(self, entry: ScheduleEntry, *, expected_version: int | None = None
                     ) -> ScheduleEntry:
        """Create or replace ``entry`` (optimistic with ``expected_version``)."""
        now = utcnow()

        def change(entries: dict[str, ScheduleEntry], _: Any) -> ScheduleEntry:
            stored = upserted(entries.get(entry.id), entry, expected_version, now)
            entries[entry.id] = stored
            return stored
        return await asyncio.to_thread(self._change, change)

    async def remove(self, entry_id: str) -> bool:
        """Delete the entry and its history."""
        def change(entries: dict[str, ScheduleEntry], history: dict[str, Any]) -> bool:
            history.pop(entry_id, None)
            return entries.pop(entry_id, None) is not None
        return await asyncio.to_thread(self._change, change)

    async def due(self, now: datetime, limit: int = 100) -> list[ScheduleEntry]:
        """Enabled entries with ``next_run_at <= now`` (the caller's clock), soonest first."""
        check_limit(limit)
        found = await asyncio.to_thread(self._snapshot)
        due = sorted((e for e in found.values() if is_due(e, now)),
                     key=lambda e: (e.next_run_at, e.id))
        return due[:limit]

    async def mark_run(self, run: ScheduleRun, *, expected_version: int,
                       next_run_at: datetime | None, jitter_ms: int = 0,
                       disable: bool = False) -> ScheduleEntry | None:
        """Record a dispatch if the entry is still at ``expected_version``."""
        return (await self.mark_runs([MarkRun(run, expected_version, next_run_at, jitter_ms,
                                              disable)]))[0]

    async def mark_runs(self, runs: Sequence[MarkRun]) -> list[ScheduleEntry | None]:
        """Record each run whose entry is still at its expected version: one locked
        read-change-write of the file for the whole batch."""
        batch = check_batch(runs)  # a bad run fails before the file is touched
        if not batch:
            return []
        now = utcnow()
        bound = self.history_max

        def change(entries: dict[str, ScheduleEntry],
                   history: dict[str, list[dict[str, Any]]]) -> list[ScheduleEntry | None]:
            out: list[ScheduleEntry | None] = []
            for item in batch:
                run = item.run
                entry = entries.get(run.entry_id)
                if entry is None or entry.version != item.expected_version:
                    out.append(None)
                    continue
                stored = run_applied(entry, run, next_run_at=item.next_run_at,
                                     jitter_ms=item.jitter_ms, disable=item.disable, now=now)
                entries[entry.id] = stored
                kept = history.setdefault(entry.id, [])
                kept.insert(0, ScheduleRun(
                    run.entry_id, ms_time(run.scheduled_at) or run.scheduled_at,
                    ms_time(run.executed_at) or run.executed_at, run.success,
                    run.duration_ms, run.error).to_dict())
                del kept[bound:]
                out.append(stored)
            return out
        return await asyncio.to_thread(self._change, change)

    async def history(self, entry_id: str, limit: int = 50) -> list[ScheduleRun]:
        """The latest runs, newest first."""
        check_limit(limit)

        def read() -> list[dict[str, Any]]:
            with self._locked():
                return list(self._read()[1].get(entry_id, []))
        out = []
        for item in (await asyncio.to_thread(read))[:limit]:
            out.append(ScheduleRun(entry_id, from_iso(item["scheduledAt"]),
                                   from_iso(item["executedAt"]), bool(item["success"]),
                                   int(item.get("durationMs") or 0), item.get("error")))
        return out

    async def close(self) -> None:
        """Nothing stays open between calls."""
