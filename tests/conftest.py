"""Shared fixtures: real services and a unique namespace per test (xdist-safe)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests import services

# Property tests judge behaviour, not speed: a loaded 2-core CI machine must not turn a
# slow example into a failure (hypothesis' default deadline is 200 ms per example).
settings.register_profile("stem", deadline=None)
settings.load_profile("stem")


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
