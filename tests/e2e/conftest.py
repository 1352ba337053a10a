"""Fixtures that run real ``stem worker start`` processes."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import WorkerProcesses
from tests.services import drop_pg_schema, drop_redis_keys

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "redis", "postgres"])
async def url(request: pytest.FixtureRequest, namespace: str, tmp_path: Path
              ) -> AsyncIterator[str]:
    """A store URL per server kind, isolated by the test's namespace (dropped after)."""
    name = request.param
    if name == "sqlite":
        yield f"sqlite:///{tmp_path / 'stem.db'}"
        return
    base = request.getfixturevalue(f"{name}_url")
    yield base
    if name == "redis":
        await drop_redis_keys(base, namespace)
    else:
        await drop_pg_schema(base, namespace)


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    d = tmp_path / "marks"
    d.mkdir()
    return d


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


@pytest.fixture
def start_worker(sqlite_url: str, marks: Path, tmp_path: Path
                 ) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``stem worker start --app tests.e2e.e2e_app:app`` on the test's SQLite file."""
    workers = WorkerProcesses(tmp_path)

    def start(*args: str, url: str | None = None) -> subprocess.Popen[bytes]:
        env = {"STEM_BROKER_URL": url or sqlite_url, "E2E_MARK_DIR": str(marks),
               "STEM_RESULT_BACKEND_URL": ""}
        return workers.start("tests.e2e.e2e_app:app", *args, env=env)

    yield start
    workers.kill_all()


def read_marks(marks: Path, kind: str, task_id: str) -> list[tuple[int, float]]:
    path = marks / f"{kind}-{task_id}"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pid, ts = line.split()
        out.append((int(pid), float(ts)))
    return out
