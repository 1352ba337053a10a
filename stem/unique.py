"""Unique tasks: at most one queued or running task per (task, queue, arguments).

A unique call takes a lock in the app's lock store, keyed by a hash of the task name,
its queue and its arguments, owned by the new task's id, in the same atomic step that
publishes it (a Redis script, a Postgres or SQLite transaction) where the broker's
store holds the locks too. While the lock is held, enqueueing an equal call returns
the existing task's id and publishes nothing. The lock is held across retries (a
retry keeps the task id) and released, owner-checked, when the task ends (success,
final failure, dead letter, expiry) — or when ``unique_for`` runs out, whichever
comes first.

The key leaves out headers and meta (trace ids, encoder ids), so equal calls hash
equally whether or not tracing is on. A task can name its own key
(``unique_key=lambda args: ...``) and a call can pass one (``with_options(
unique_key="order-7")``).

Envelope meta, as the Dart Stem writes it: ``stem.unique.key``, ``stem.unique.owner``
(the task id) and ``stem.unique.expiresAt`` (ISO-8601). A deduplicated call is
recorded on the pending task's status, in the list at meta ``stem.unique.duplicates``
(:func:`duplicate_record`, the Dart shape), and counted in ``app.stats.deduplicated``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from stem._time import from_iso, to_iso
from stem.encoding import json_default
from stem.errors import ConfigurationError

if TYPE_CHECKING:
    from stem.envelope import Envelope

__all__ = [
    "DEFAULT_UNIQUE_FOR",
    "MAX_DUPLICATES",
    "META_UNIQUE_DUPLICATES",
    "META_UNIQUE_EXPIRES_AT",
    "META_UNIQUE_KEY",
    "META_UNIQUE_OWNER",
    "check_unique_for",
    "duplicate_record",
    "lock_key",
    "unique_key_of",
    "unique_lock_of",
]

META_UNIQUE_KEY = "stem.unique.key"
META_UNIQUE_OWNER = "stem.unique.owner"
META_UNIQUE_EXPIRES_AT = "stem.unique.expiresAt"
#: Status meta key of the list of deduplicated calls (the Dart Stem's).
META_UNIQUE_DUPLICATES = "stem.unique.duplicates"
#: Entries that list keeps (the newest).
MAX_DUPLICATES = 100
#: Headers a duplicate's record leaves out: signatures and what looks like a credential.
_SECRET_HEADER = re.compile(r"signature|authori[sz]ation|cookie|token|secret|passw|api[-_]?key",
                            re.IGNORECASE)
#: How long a unique lock lives when neither ``unique_for`` nor a visibility timeout
#: says (the Dart default: five minutes).
DEFAULT_UNIQUE_FOR = 300.0
#: Prefix of the lock keys in the lock store (the Dart Stem's).
LOCK_PREFIX = "stem:unique:"


def check_unique_for(seconds: float | None) -> float | None:
    """``unique_for`` must be a positive, finite number of seconds (or None)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
            0 < seconds < math.inf):
        raise ConfigurationError(
            f"unique_for must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def unique_key_of(name: str, queue: str, args: Mapping[str, Any]) -> str:
    """The default key: sha256 of the task name, queue and arguments as canonical JSON
    (keys sorted at every level; datetimes, UUIDs, enums, dataclasses and pydantic
    models as they travel)."""
    material = orjson.dumps({"task": name, "queue": queue, "args": args},
                            option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                            default=json_default)
    return hashlib.sha256(material).hexdigest()


def lock_key(key: str) -> str:
    """The lock store key of a unique key."""
    return LOCK_PREFIX + key


def unique_lock_of(meta: Mapping[str, Any], task_id: str, now: datetime
                   ) -> tuple[str, float] | None:
    """(lock key, seconds left) for an envelope whose meta asks for a unique lock owned
    by ``task_id``; None for other envelopes (or a lease that already ran out)."""
    key = meta.get(META_UNIQUE_KEY)
    if not isinstance(key, str) or not key or meta.get(META_UNIQUE_OWNER) != task_id:
        return None
    raw = meta.get(META_UNIQUE_EXPIRES_AT)
    try:
        until = from_iso(raw) if isinstance(raw, str) else None
    except ValueError:
        until = None
    seconds = DEFAULT_UNIQUE_FOR if until is None else (until - now).total_seconds()
    return (lock_key(key), seconds) if seconds > 0 else None


def unique_meta(key: str, task_id: str, now: datetime, seconds: float) -> dict[str, Any]:
    """The meta a unique call's envelope carries."""
    return {META_UNIQUE_KEY: key, META_UNIQUE_OWNER: task_id,
            META_UNIQUE_EXPIRES_AT: to_iso(now + timedelta(seconds=seconds))}


def duplicate_record(duplicate: Envelope, now: datetime) -> dict[str, Any]:
    """The entry a deduplicated call adds to the pending task's ``stem.unique.duplicates``
    (the Dart Stem's shape): the id the duplicate would have had, when, and its headers
    and meta — headers without signatures or anything named like a credential."""
    return {"taskId": duplicate.id, "timestamp": to_iso(now),
            "headers": {k: v for k, v in duplicate.headers.items()
                        if not _SECRET_HEADER.search(k)},
            "meta": dict(duplicate.meta)}
