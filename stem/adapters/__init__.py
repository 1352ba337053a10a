"""Adapters by URL scheme. Each adapter package exposes ``broker_from_url`` and
``backend_from_url`` (and later the other stores); nothing here opens a connection:
adapters connect lazily and ``ping()`` fails fast with a clear message."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

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


def _module(url: str, what: str) -> Any:
    check_url(url, what)
    return importlib.import_module(_MODULES[urlsplit(url).scheme])


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
