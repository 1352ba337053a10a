"""``stem worker start --pool 2`` as a real process on SQLite: kills, crashes, recycling,
SIGTERM to the worker and to its whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

import stem
from stem import TaskState
from tests.helpers import WorkerProcesses
from tests.isolation.conftest import alive, read_marks, until
from tests.isolation.iso_app import SPEC

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


@pytest.fixture
def start_worker(sqlite_url: str, marks: Path, tmp_path: Path) -> Iterator[Start]:
    workers = WorkerProcesses(tmp_path)

    def start(*args: str) -> subprocess.Popen[bytes]:
        env = {"ISO_BROKER_URL": sqlite_url, "ISO_MARK_DIR": str(marks)}
        return workers.start(SPEC, *args, env=env)

    yield start
    workers.kill_all()


@pytest.fixture
async def producer(sqlite_url: str) -> AsyncIterator[stem.Stem]:
    app = stem.Stem("producer", broker=sqlite_url, backend=sqlite_url,
                    namespace="iso")  # the worker's app: Stem("iso")
    yield app
    await app.close()


async def test_pool_worker_kills_runaways_survives_crashes_recycles_and_drains(
        start_worker: Start, producer: stem.Stem, marks: Path) -> None:
    proc = start_worker("--pool", "2", "--max-tasks-per-child", "5", "--grace", "20")
    spin = await producer.enqueue("iso.spin")  # time_limit=1, max_retries=1 (worker side)
    crash = await producer.enqueue("iso.crash_segv")
    pids = [await producer.wait(await producer.enqueue("iso.pid"), timeout=30)
            for _ in range(20)]
    res_spin = await producer.wait(spin, timeout=30)
    res_crash = await producer.wait(crash, timeout=30)
    runs = read_marks(marks, "spin", spin)

    assert res_spin.state is TaskState.FAILED and res_spin.attempt == 1
    assert res_spin.error is not None and res_spin.error.type == "TimeLimitExceeded"
    assert len(runs) == 2
    assert res_crash.error is not None and res_crash.error.type == "WorkerLostError"
    assert "signal SIGSEGV" in res_crash.error.message
    assert all(r.state is TaskState.SUCCEEDED for r in pids)
    children = {r.value for r in pids}
    assert proc.pid not in children and len(children) >= 4  # 5 tasks per child at most

    last = await producer.wait(await producer.enqueue("iso.sleepy", seconds=0.5), timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert last.state is TaskState.SUCCEEDED
    # No child outlives the worker.
    for pid in {*children, last.value, *(pid for pid, _ in runs)}:
        await until(lambda pid=pid: not alive(pid), timeout=5)


async def test_children_of_a_sigkilled_worker_exit_and_its_task_runs_again(
        start_worker: Start, producer: stem.Stem, marks: Path) -> None:
    first = start_worker("--pool", "1")
    tid = await producer.enqueue_call(
        producer.definition("iso.nap").call(seconds=30).with_options(visibility_timeout=1.5))
    [(child, _)] = await until(lambda: read_marks(marks, "nap", tid), timeout=30)
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    # The child sees its socket close and exits mid-task instead of lingering.
    await until(lambda: not alive(child), timeout=5)
    start_worker("--pool", "1")
    await until(lambda: len(read_marks(marks, "nap", tid)) == 2, timeout=30)
    assert read_marks(marks, "nap", tid)[1][0] != child


def test_pool_worker_with_an_unimportable_app_exits_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "ISO_BROKER_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    # The worker imports the app fine; its pool children can't (see iso_app).
    env["ISO_FAIL_IN_CHILD"] = "1"
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "stem_cli", "worker", "start", "--app", SPEC, "--pool", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr  # a ConfigurationError: the CLI exits 2
    assert "stem: error: the process pool could not start" in out.stderr
    assert "refuses to load in a pool child" in out.stderr
    assert time.monotonic() - t0 < 30



@pytest.fixture
def group_worker(sqlite_url: str, marks: Path, tmp_path: Path) -> Iterator[Start]:
    """Start ``stem worker start`` as the leader of its own process group (as systemd or a
    terminal runs it); the whole group is SIGKILLed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "ISO_BROKER_URL": sqlite_url, "ISO_MARK_DIR": str(marks)}
        with (tmp_path / f"group-worker-{len(procs)}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stem_cli", "worker", "start", "--app", SPEC,
                 "--block-time", "0.1", *args],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_to_the_whole_process_group_drains_like_one_to_the_worker(
        group_worker: Start, producer: stem.Stem, marks: Path, tmp_path: Path,
        sig: signal.Signals) -> None:
    """``kill -TERM -PGID`` (systemd's KillMode=control-group, container runtimes) or Ctrl-C
    (SIGINT to the foreground group) reaches the pool children too: they ignore it, the
    tasks they are running finish and succeed, the worker drains and exits 0."""
    proc = group_worker("--pool", "2", "--grace", "30")
    assert os.getpgid(proc.pid) == proc.pid
    ids = [await producer.enqueue("iso.nap", seconds=1.5) for _ in range(2)]
    started = await until(
        lambda: all(read_marks(marks, "nap", t) for t in ids) and
        [read_marks(marks, "nap", t)[0][0] for t in ids], timeout=30)
    assert len(set(started)) == 2 and proc.pid not in started
    assert all(os.getpgid(pid) == proc.pid for pid in started)  # the children are in the group
    os.killpg(proc.pid, sig)
    assert proc.wait(30) == 0, (tmp_path / "group-worker-0.log").read_text()
    results = [await producer.wait(t, timeout=5) for t in ids]
    assert [r.state for r in results] == [TaskState.SUCCEEDED] * 2, [r.error for r in results]
    # Each ran once, to the end, in the child that took it; no child outlives the worker.
    assert [r.value for r in results] == started
    assert [len(read_marks(marks, "nap", t)) for t in ids] == [1, 1]
    for pid in started:
        await until(lambda pid=pid: not alive(pid), timeout=5)
