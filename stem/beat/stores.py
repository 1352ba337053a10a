"""Which schedule store and lock store a beat or the ``stem schedule`` CLI uses.

A schedule-store URL is a store URL (``memory://``, ``sqlite:///...``, ``redis://``,
``postgresql://``: the store's ``schedules`` part), or ``file://PATH`` / a path ending in
``.json``, ``.yaml`` or ``.yml`` for a :class:`~stem.beat.file_store.FileScheduleStore`.
Without one: ``STEM_SCHEDULE_STORE_URL``, else the file at ``STEM_SCHEDULE_FILE``, else
``.stem/schedules.json``.

The lock store: ``--lock-store`` / ``STEM_LOCK_STORE_URL``, else the schedule store's
URL when it is a store URL, else the app's broker store. A file store has no locks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stem._urls import mask_url
from stem.beat.file_store import FileScheduleStore
from stem.errors import ConfigurationError
from stem.ports import LockStore, ScheduleStore, Store

__all__ = ["BeatStores", "is_file_url", "open_beat_stores"]


def is_file_url(url: str) -> bool:
    """True for ``file://...`` and for a path ending in .json, .yaml or .yml."""
    return url.startswith("file:") or (url.lower().endswith((".json", ".yaml", ".yml")) \
        and "://" not in url)


def _file_path(url: str) -> str:
    if url.startswith("file:"):
        parts = urlsplit(url)
        return (parts.netloc + parts.path) if parts.netloc not in ("", "localhost") \
            else parts.path
    return url


def _part(store: Store, attr: str, url: str) -> Any:
    try:
        return getattr(store, attr)
    except (NotImplementedError, AttributeError):
        kind = "schedule" if attr == "schedules" else "lock"
        raise ConfigurationError(f"{mask_url(url)} has no {kind} store in this version of "
                                 "Stem") from None


@dataclass
class BeatStores:
    """The schedule store and lock store in use, and the stores to close afterwards."""

    schedules: ScheduleStore
    schedule_url: str
    locks: LockStore | None = None
    lock_url: str | None = None
    owned: list[Store] = field(default_factory=list)

    async def close(self) -> None:
        """Close the stores opened for these parts."""
        for store in self.owned:
            await store.close()
        await self.schedules.close()


def open_beat_stores(schedule_url: str | None = None, lock_url: str | None = None, *,
                     namespace: str = "stem", app_store: Store | None = None,
                     want_locks: bool = True) -> BeatStores:
    """Resolve the schedule store and (with ``want_locks``) the lock store; nothing
    connects until first use."""
    from stem.adapters import store_from_url

    schedule_url = schedule_url or os.environ.get("STEM_SCHEDULE_STORE_URL") or None
    owned: list[Store] = []
    stores: dict[str, Store] = {}

    def store(url: str) -> Store:
        if url not in stores:
            stores[url] = store_from_url(url, namespace=namespace)
            owned.append(stores[url])
        return stores[url]

    if schedule_url is None or is_file_url(schedule_url):
        files = FileScheduleStore(_file_path(schedule_url) if schedule_url else None)
        schedules: ScheduleStore = files
        schedule_url = files.url
        file_based = True
    else:
        schedules = _part(store(schedule_url), "schedules", schedule_url)
        file_based = False
    result = BeatStores(schedules, schedule_url, owned=owned)
    if not want_locks:
        return result
    lock_url = lock_url or os.environ.get("STEM_LOCK_STORE_URL") or None
    if lock_url is None and not file_based:
        lock_url = schedule_url
    if lock_url is not None:
        result.locks, result.lock_url = _part(store(lock_url), "locks", lock_url), lock_url
    elif app_store is not None:
        result.locks, result.lock_url = _part(app_store, "locks", app_store.url), app_store.url
    return result
