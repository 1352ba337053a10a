"""Revocation with real worker processes on SQLite, Redis and Postgres: a delayed task
revoked never runs; a revoke issued before any worker starts is honoured by a new one;
two running workers apply a new revoke within a second; --terminate stops a running
task in the process pool, inline async and in a thread, stored cancelled and never run
again, even after its worker is stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import stem
from stem import TaskState
from tests.helpers import WorkerProcesses, eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    d = tmp_path / "marks"
    d.mkdir()
    return d


@pytest.fixture
async def producer(url: str, namespace: str) -> AsyncIterator[stem.Stem]:
    app = stem.Stem("producer", broker=url, namespace=namespace)
    await app.broker.ping()  # schema in place before workers race for it
    yield app
    await app.close()


@pytest.fixture
def start(url: str, namespace: str, marks: Path, tmp_path: Path
          ) -> AsyncIterator[Callable[..., subprocess.Popen[bytes]]]:
    workers = WorkerProcesses(tmp_path)
    env = {"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "", "STEM_NAMESPACE": namespace,
           "E2E_MARK_DIR": str(marks)}

    def go(*args: str) -> subprocess.Popen[bytes]:
        return workers.start("tests.e2e.revoke_app:app", "--grace", "3", *args, env=env)

    yield go  # type: ignore[misc]
    workers.kill_all()


async def _state(app: stem.Stem, task_id: str, state: TaskState) -> stem.TaskStatus | None:
    status = await app.backend.get(task_id)
    return status if status is not None and status.state is state else None


async def _started(marks: Path, task_id: str) -> bool:
    return (marks / f"started-{task_id}").exists()


async def test_revoked_before_any_worker_and_delayed_tasks_never_run(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]],
        marks: Path) -> None:
    before = await producer.enqueue("rv.work")
    delayed = await producer.enqueue("rv.work", countdown=1.5)
    kept = await producer.enqueue("rv.work")
    await producer.revoke([before, delayed], reason="bad batch")
    start()
    assert await eventually(lambda: _state(producer, kept, TaskState.SUCCEEDED), timeout=30)
    status = await eventually(lambda: _state(producer, delayed, TaskState.CANCELLED),
                              timeout=30)
    assert await _state(producer, before, TaskState.CANCELLED)
    assert status.meta["revoked"] is True and status.meta["revokedReason"] == "bad batch"
    assert status.meta["revokedBy"] and status.meta["revokedAt"]
    assert not (marks / f"ran-{before}").exists() and not (marks / f"ran-{delayed}").exists()


async def test_two_running_workers_apply_a_new_revoke_within_a_second(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]],
        marks: Path) -> None:
    start()
    start()
    warm = await producer.enqueue("rv.work")
    assert await eventually(lambda: _state(producer, warm, TaskState.SUCCEEDED), timeout=30)
    # Queued now, due in 1 s: both workers are running and must have learnt of the
    # revoke by then, whichever of them fetches it.
    ids = [await producer.enqueue("rv.work", countdown=1.0) for _ in range(4)]
    await producer.revoke(ids)
    for task_id in ids:
        await eventually(lambda t=task_id: _state(producer, t, TaskState.CANCELLED),  # type: ignore[misc]
                         timeout=30)
    assert not any((marks / f"ran-{t}").exists() for t in ids)


@pytest.mark.parametrize("task", ["rv.spin_process", "rv.spin_async", "rv.spin_thread"])
async def test_terminate_stops_a_running_task(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]], marks: Path,
        task: str) -> None:
    worker = start()
    task_id = await producer.enqueue(task)
    await eventually(lambda: _started(marks, task_id), timeout=30)
    t0 = time.monotonic()
    await producer.revoke(task_id, terminate=True, reason="runaway")
    status = await eventually(lambda: _state(producer, task_id, TaskState.CANCELLED),
                              timeout=10, interval=0.05)
    assert time.monotonic() - t0 < 2.0
    assert status.meta["revoked"] is True and status.meta["revokedReason"] == "runaway"
    # Its worker stops (SIGTERM) and another starts: the task is not run again.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    start()
    later = await producer.enqueue("rv.work")
    assert await eventually(lambda: _state(producer, later, TaskState.SUCCEEDED), timeout=30)
    assert len((marks / f"started-{task_id}").read_text().splitlines()) == 1
    assert (await producer.backend.get(task_id)).state is TaskState.CANCELLED  # type: ignore[union-attr]


def test_cli_revoke(url: str, namespace: str) -> None:
    env = {"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "", "STEM_NAMESPACE": namespace}
    out = subprocess.run(
        [sys.executable, "-m", "stem_cli", "worker", "revoke", "id-1", "id-2", "--terminate",
         "--reason", "oops", "--expires-in", "1h", "--json"],
        cwd=ROOT, env={**__import__("os").environ, **env}, capture_output=True, text=True,
        timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    entries = json.loads(out.stdout)
    assert [e["taskId"] for e in entries] == ["id-1", "id-2"]
    assert all(e["terminate"] and e["reason"] == "oops" and e["expiresAt"] for e in entries)
    assert entries[1]["version"] == entries[0]["version"] + 1


async def test_cli_purge_asks_and_deletes_by_id(producer: stem.Stem, url: str,
                                                namespace: str) -> None:
    import os

    env = {**os.environ, "STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "",
           "STEM_NAMESPACE": namespace}
    ids = [await producer.enqueue("rv.work") for _ in range(3)]

    def stem_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stem_cli", *args], cwd=ROOT, env=env,
                              input=stdin, capture_output=True, text=True, timeout=60)

    no = stem_cli("purge", "-Q", "default", stdin="n\n")
    assert no.returncode == 1 and "aborted" in no.stderr
    one = stem_cli("purge", "-Q", "default", "--id", ids[0], "--yes")
    assert one.returncode == 0 and "default: deleted 1" in one.stdout, one.stderr
    rest = stem_cli("purge", "-Q", "default", stdin="y\n")
    assert rest.returncode == 0 and "default: deleted 2" in rest.stdout, rest.stderr
    assert (await producer.broker.stats("default")).pending == 0
