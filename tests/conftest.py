"""Shared fixtures: real services and a unique namespace per test (xdist-safe)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import services


@pytest.fixture
def namespace() -> str:
    """A key prefix / schema name no other test uses."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A reachable Redis server (never skipped: a missing one fails the test)."""
    yield services.redis_url()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A reachable Postgres database (never skipped: a missing one fails the test)."""
    yield services.postgres_url()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    services.stop_started()
