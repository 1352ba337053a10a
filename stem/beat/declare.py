"""Schedules declared in code: what ``@app.periodic`` and ``app.add_periodic_task`` build.

The beat merges them into its schedule store when it starts (see
:func:`stem.beat.beat.sync_entries`): code is the source of truth for the entries it
declares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from stem.beat.entry import ScheduleEntry
from stem.beat.specs import normalize_spec, parse_duration, zone
from stem.errors import ConfigurationError, TaskArgumentError

if TYPE_CHECKING:
    from stem.task import TaskDefinition

__all__ = ["CatchUp", "periodic_entry"]

#: What a beat does with runs an entry missed: fire one now ("once") or none ("skip").
CatchUp = Literal["once", "skip"]


def periodic_entry(
    spec: str | Mapping[str, Any] | float | timedelta,
    definition: TaskDefinition[..., Any],
    *,
    name: str | None = None,
    args: Sequence[Any] | Mapping[str, Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    tz: str | None = None,
    enabled: bool = True,
    jitter: float | str | timedelta | None = None,
    catch_up: CatchUp = "once",
    expire_at: datetime | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ScheduleEntry:
    """A :class:`ScheduleEntry` for ``definition`` (checked now: spec, time zone, arguments).

    ``spec`` is a cron string, ``"every:30s"``, a Dart spec object, or a number of
    seconds / a timedelta (an interval). ``args`` (a sequence, bound to the task's
    parameter names, or a mapping) and ``kwargs`` are the task's arguments. ``jitter``
    is the most a dispatch is delayed at random (seconds, ``"5s"`` or a timedelta).
    """
    entry_id = name or definition.name
    if not isinstance(entry_id, str) or not entry_id:
        raise ConfigurationError(f"a periodic task needs a non-empty name, got {entry_id!r}")
    where = f"periodic task {entry_id!r}"
    spec_json = normalize_spec(dict(spec) if isinstance(spec, Mapping) else spec,
                               entry_id=entry_id)
    if tz is not None:
        zone(tz)  # an unknown zone fails here, not in the beat
    if catch_up not in ("once", "skip"):
        raise ConfigurationError(f"{where}: catch_up must be 'once' or 'skip', got {catch_up!r}")
    if expire_at is not None and expire_at.tzinfo is None:
        raise ConfigurationError(f"{where}: expire_at must be an aware datetime")
    try:
        if isinstance(args, Mapping):
            bound = {**dict(args), **dict(kwargs or {})}
        else:
            bound = definition.bind(tuple(args or ()), dict(kwargs or {}))
    except TaskArgumentError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    jitter_ms = 0 if jitter is None else parse_duration(jitter, what=f"{where}: jitter")
    entry_meta = dict(meta or {})
    if catch_up == "skip":
        entry_meta["stem.catchUp"] = "skip"
    return ScheduleEntry(id=entry_id, task=definition.name, spec=spec_json, args=bound,
                         queue=queue or definition.options.queue, enabled=enabled,
                         jitter_ms=jitter_ms, timezone=tz, expire_at=expire_at, meta=entry_meta)
