"""Fixtures that run real ``stem worker start`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, url: str | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "STEM_BROKER_URL": url or sqlite_url, "E2E_MARK_DIR": str(marks)}
        env.pop("STEM_RESULT_BACKEND_URL", None)
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "stem_cli", "worker", "start", "--app",
             "tests.e2e.e2e_app:app", "--block-time", "0.1", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)


def read_marks(marks: Path, kind: str, task_id: str) -> list[tuple[int, float]]:
    path = marks / f"{kind}-{task_id}"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pid, ts = line.split()
        out.append((int(pid), float(ts)))
    return out
