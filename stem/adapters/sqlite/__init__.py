"""SQLite adapters: ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db``.

Several processes on one host share the file (WAL mode, ``BEGIN IMMEDIATE`` claims).
The broker, the backend and the beat's lock and schedule stores may use the same file:
their tables have distinct names (``<namespace>_jobs``, ``<namespace>_dead_letters``,
``<namespace>_results``, ``<namespace>_locks``, ``<namespace>_schedules``,
``<namespace>_schedule_runs``). Nothing is opened until first use; parent directories
are created then. The one URL option, ``?dead_letter_retention=`` (seconds, or ``12h``,
``30d``; default 7 days), is how long dead letters are kept.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import SqliteBackend
    from .broker import SqliteBroker
    from .locks import SqliteLockStore
    from .schedules import SqliteScheduleStore
    from .store import SqliteStore, store_from_url

__all__ = [
    "SqliteBackend", "SqliteBroker", "SqliteLockStore", "SqliteScheduleStore", "SqliteStore",
    "backend_from_url", "broker_from_url", "store_from_url",
]

# Imported on first use: a worker of another broker imports ``._paths`` (for
# ``path_from_url``), which runs this package, and needs none of the adapters.
_LAZY = {
    "SqliteBackend": ".backend", "SqliteBroker": ".broker", "SqliteLockStore": ".locks",
    "SqliteScheduleStore": ".schedules", "SqliteStore": ".store", "store_from_url": ".store",
    "dead_letter_retention_from_url": "._paths", "path_from_url": "._paths",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def broker_from_url(url: str, *, namespace: str = "stem") -> SqliteBroker:
    """A :class:`SqliteBroker` on the file named by ``url``."""
    from ._paths import dead_letter_retention_from_url, path_from_url
    from .broker import SqliteBroker

    return SqliteBroker(path_from_url(url), namespace=namespace,
                        dead_letter_retention=dead_letter_retention_from_url(url))


def backend_from_url(url: str, *, namespace: str = "stem") -> SqliteBackend:
    """A :class:`SqliteBackend` on the file named by ``url``."""
    from ._paths import path_from_url
    from .backend import SqliteBackend

    return SqliteBackend(path_from_url(url), namespace=namespace)
