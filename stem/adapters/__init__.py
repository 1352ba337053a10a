"""Adapters by URL scheme: one store per URL (see :class:`stem.ports.Store`).

Each adapter package exposes ``store_from_url`` (plus ``broker_from_url`` and
``backend_from_url`` for a part with connections of its own). Nothing here opens a
connection: stores connect lazily and ``ping()`` fails fast with a clear message.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from stem._extras import require
from stem.config import check_url
from stem.ports import Broker, ResultBackend, Store

#: The one list of URL schemes: scheme -> (adapter module, extra it needs, example URL).
SCHEMES: dict[str, tuple[str, str | None, str]] = {
    "memory": ("stem.adapters.memory", None, "memory://"),
    "sqlite": ("stem.adapters.sqlite", None, "sqlite:///path.db"),
    "redis": ("stem.adapters.redis", "redis", "redis://host:6379/0"),
    "rediss": ("stem.adapters.redis", "redis", "rediss://..."),
    "redis+sentinel": ("stem.adapters.redis", "redis", "redis+sentinel://..."),
    "postgres": ("stem.adapters.postgres", "postgres", "postgresql://user@host/db"),
    "postgresql": ("stem.adapters.postgres", "postgres", "postgresql://user@host/db"),
}


def _module(url: str, what: str) -> Any:
    check_url(url, what)
    module, extra, _ = SCHEMES[urlsplit(url).scheme]
    if extra is not None:
        require(extra)  # a missing driver is named with the extra to install
    return importlib.import_module(module)


def store_from_url(url: str, *, namespace: str = "stem") -> Store:
    """Build (without connecting) the store for ``url``: its broker, backend, ..."""
    store: Store = _module(url, "store").store_from_url(url, namespace=namespace)
    return store


def broker_from_url(url: str, *, namespace: str = "stem") -> Broker:
    """Build (without connecting) a broker for ``url`` with connections of its own."""
    broker: Broker = _module(url, "broker").broker_from_url(url, namespace=namespace)
    return broker


def backend_from_url(url: str, *, namespace: str = "stem") -> ResultBackend:
    """Build (without connecting) a result backend for ``url`` with connections of its own."""
    backend: ResultBackend = _module(url, "result backend").backend_from_url(
        url, namespace=namespace
    )
    return backend
