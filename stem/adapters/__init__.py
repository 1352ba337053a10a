"""Adapters by URL scheme. Each adapter package exposes ``broker_from_url`` and
``backend_from_url`` (and later the other stores); nothing here opens a connection:
adapters connect lazily and ``ping()`` fails fast with a clear message."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from stem._extras import require
from stem.config import check_url
from stem.ports import Broker, ResultBackend

_MODULES = {
    "memory": "stem.adapters.memory",
    "sqlite": "stem.adapters.sqlite",
    "redis": "stem.adapters.redis",
    "rediss": "stem.adapters.redis",
    "redis+sentinel": "stem.adapters.redis",
    "postgres": "stem.adapters.postgres",
    "postgresql": "stem.adapters.postgres",
}


#: The extra (stem._extras) each adapter needs beyond the base install.
_EXTRA = {"stem.adapters.redis": "redis", "stem.adapters.postgres": "postgres"}


def _module(url: str, what: str) -> Any:
    check_url(url, what)
    name = _MODULES[urlsplit(url).scheme]
    if name in _EXTRA:
        require(_EXTRA[name])  # a missing driver is named with the extra to install
    return importlib.import_module(name)


def broker_from_url(url: str, *, namespace: str = "stem") -> Broker:
    """Build (without connecting) the broker for ``url``."""
    broker: Broker = _module(url, "broker").broker_from_url(url, namespace=namespace)
    return broker


def backend_from_url(url: str, *, namespace: str = "stem") -> ResultBackend:
    """Build (without connecting) the result backend for ``url``."""
    backend: ResultBackend = _module(url, "result backend").backend_from_url(
        url, namespace=namespace
    )
    return backend
