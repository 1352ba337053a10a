"""The control plane with real worker processes on SQLite, Redis and Postgres: ping/stats/inspect from three workers answer all three; shutdown warm finishes
in-flight work, hard requeues it for another worker; a paused queue stops only that
queue, survives a worker restart and resumes; stem worker status; stem health exit
codes with an unreachable Redis and a wrong Postgres password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import stem
from stem import TaskState
from stem.control import ControlClient
from tests.helpers import WorkerProcesses, eventually, wait_until
from tests.services import drop_pg_schema, drop_redis_keys

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    marks = tmp_path / "marks"
    marks.mkdir()
    return {"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "", "STEM_NAMESPACE": namespace,
            "E2E_MARK_DIR": str(marks), "STEM_HEARTBEAT_INTERVAL": "1"}


@pytest.fixture
async def producer(url: str, namespace: str) -> AsyncIterator[stem.Stem]:
    app = stem.Stem("producer", broker=url, namespace=namespace)
    await app.broker.ping()
    yield app
    await app.close()


@pytest.fixture
def start(env: dict[str, str], tmp_path: Path
          ) -> AsyncIterator[Callable[..., subprocess.Popen[bytes]]]:
    workers = WorkerProcesses(tmp_path)

    def go(*args: str) -> subprocess.Popen[bytes]:
        return workers.start("tests.e2e.revoke_app:app", *args, env=env)

    yield go  # type: ignore[misc]
    workers.kill_all()


def stem_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stem_cli", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


async def _live(app: stem.Stem, n: int) -> list[str] | None:
    ids = [h.worker_id for h in await ControlClient(app).workers() if not h.stale]
    return ids if len(ids) == n else None


async def _state(app: stem.Stem, task_id: str, state: TaskState) -> stem.TaskStatus | None:
    status = await app.backend.get(task_id)
    return status if status is not None and status.state is state else None


async def test_three_workers_answer_ping_stats_inspect(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]],
        env: dict[str, str]) -> None:
    for _ in range(3):
        start()
    ids = await eventually(lambda: _live(producer, 3), timeout=60)
    busy = await producer.enqueue("rv.sleep", seconds=30)
    await eventually(lambda: _marked(env, busy), timeout=30)
    for command in ("ping", "stats", "inspect"):
        out = stem_cli(env, "worker", command, "--json", "--timeout", "10s")
        assert out.returncode == 0, out.stderr
        replies = json.loads(out.stdout)
        assert sorted(r["workerId"] for r in replies) == sorted(ids), command
        assert all(r["status"] == "ok" for r in replies)
    stats = {r["workerId"]: r["payload"] for r in json.loads(
        stem_cli(env, "worker", "stats", "--json").stdout)}
    assert sum(p["inflight"] for p in stats.values()) == 1
    assert all(set(p["queues"]) == {"default", "other"} for p in stats.values())
    inspect = json.loads(stem_cli(env, "worker", "inspect", "--json").stdout)
    active = [a for r in inspect for a in r["payload"]["active"]]
    assert [a["id"] for a in active] == [busy] and active[0]["runtimeMs"] >= 0
    one = stem_cli(env, "worker", "ping", "--worker", ids[0], "--json")
    assert [r["workerId"] for r in json.loads(one.stdout)] == [ids[0]]
    table = stem_cli(env, "worker", "stats")
    assert table.returncode == 0 and all(i in table.stdout for i in ids), table.stdout
    status = stem_cli(env, "worker", "status", "--json")
    assert sorted(w["workerId"] for w in json.loads(status.stdout)) == sorted(ids)
    await producer.revoke(busy, terminate=True)


async def _marked(env: dict[str, str], task_id: str, kind: str = "started") -> bool:
    return (Path(env["E2E_MARK_DIR"]) / f"{kind}-{task_id}").exists()


async def test_shutdown_warm_finishes_and_hard_requeues(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]],
        env: dict[str, str]) -> None:
    first = start("--grace", "0.5")
    await eventually(lambda: _live(producer, 1), timeout=60)
    task_id = await producer.enqueue("rv.sleep", seconds=2)
    await eventually(lambda: _marked(env, task_id), timeout=30)
    out = stem_cli(env, "worker", "shutdown", "--mode", "warm", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["payload"]["mode"] == "warm"
    assert first.wait(30) == 0
    # Warm waited past its 0.5 s grace: the task finished on it.
    status = await eventually(lambda: _state(producer, task_id, TaskState.SUCCEEDED), timeout=10)
    assert status.payload == first.pid

    second = start()
    [wid2] = await eventually(lambda: _live(producer, 1), timeout=60)
    long_id = await producer.enqueue("rv.sleep", seconds=3)
    await eventually(lambda: _marked(env, long_id), timeout=30)
    out = stem_cli(env, "worker", "shutdown", "--mode", "hard", "--worker", wid2, "--json")
    assert out.returncode == 0, out.stderr
    second.wait(30)
    assert not await _marked(env, long_id, "finished")
    third = start()
    status = await eventually(lambda: _state(producer, long_id, TaskState.SUCCEEDED),
                              timeout=60)
    assert status.payload == third.pid  # requeued at once, run by another worker


async def test_pause_one_queue_survives_restart_and_resumes(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]],
        env: dict[str, str]) -> None:
    worker = start()
    await eventually(lambda: _live(producer, 1), timeout=60)
    out = stem_cli(env, "worker", "pause", "-Q", "other", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["payload"]["paused"] == ["other"]
    held = await producer.enqueue(producer.definition("rv.other", queue="other"))
    ran = await producer.enqueue("rv.work")
    assert await eventually(lambda: _state(producer, ran, TaskState.SUCCEEDED), timeout=30)
    worker.terminate()
    assert worker.wait(30) == 0
    start()
    await eventually(lambda: _live(producer, 1), timeout=60)
    again = await producer.enqueue("rv.work")
    assert await eventually(lambda: _state(producer, again, TaskState.SUCCEEDED), timeout=30)
    assert not await _marked(env, held, "ran")  # still paused after the restart
    assert (await producer.broker.stats("other")).pending == 1
    out = stem_cli(env, "worker", "resume", "-Q", "other")
    assert out.returncode == 0, out.stderr
    assert await eventually(lambda: _state(producer, held, TaskState.SUCCEEDED), timeout=30)


def _wrong_password(url: str) -> str:
    """``url`` with credentials the server refuses: a wrong password, and an unknown
    user (a test server with ``trust`` authentication accepts any password)."""
    parts = urlsplit(url)
    user = "stem_no_such_user"
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:definitely-wrong@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture(params=["redis", "postgres"])
async def server_url(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[str]:
    base = request.getfixturevalue(f"{request.param}_url")
    yield base
    if request.param == "redis":
        await drop_redis_keys(base, namespace)
    else:
        await drop_pg_schema(base, namespace)


def test_health_exit_codes(server_url: str, namespace: str) -> None:
    url = server_url
    env = {"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "", "STEM_NAMESPACE": namespace}
    ok = stem_cli(env, "health", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert all(c["success"] for c in json.loads(ok.stdout))
    bad_url = ("redis://127.0.0.1:1/0" if url.startswith("redis")
               else _wrong_password(url))
    bad = stem_cli({**env, "STEM_BROKER_URL": bad_url}, "health", "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    checks = json.loads(bad.stdout)
    assert not any(c["success"] for c in checks)
    assert "definitely-wrong" not in bad.stdout
    table = stem_cli({**env, "STEM_BROKER_URL": bad_url}, "health")
    assert table.returncode == 1 and "FAILED" in table.stdout


def _follow_twice(env: dict[str, str]) -> str:
    """Run ``stem worker status --follow`` until it printed its table twice, then Ctrl-C;
    its output."""
    import signal

    log = Path(env["E2E_MARK_DIR"]).parent / "follow.out"
    with log.open("w") as sink:
        follow = subprocess.Popen(
            [sys.executable, "-m", "stem_cli", "worker", "status", "--follow"], cwd=ROOT,
            env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT, text=True)
        # The interval is 1 s: --follow prints the table again and again.
        wait_until(lambda: log.read_text().count("workers") >= 2, timeout=30)
        follow.send_signal(signal.SIGINT)
        assert follow.wait(30) == 0
    return log.read_text()


async def test_status_lists_live_workers_and_marks_a_killed_one_stale(
        producer: stem.Stem, start: Callable[..., subprocess.Popen[bytes]],
        env: dict[str, str]) -> None:
    import signal

    worker = start()
    [wid] = await eventually(lambda: _live(producer, 1), timeout=60)
    assert wid in _follow_twice(env)
    [observed] = [json.loads(line) for line in
                  stem_cli(env, "observe", "workers", "--json").stdout.splitlines()]
    assert [w["workerId"] for w in observed["workers"]] == [wid]
    worker.send_signal(signal.SIGKILL)  # no chance to remove its heartbeat
    worker.wait(30)

    async def stale() -> list[dict[str, object]] | None:
        rows = json.loads(stem_cli(env, "worker", "status", "--json").stdout)
        return rows if rows and all(r["stale"] for r in rows) else None

    rows = await eventually(stale, timeout=30, interval=0.3)
    assert [r["workerId"] for r in rows] == [wid]
    assert "STALE" in stem_cli(env, "worker", "status").stdout
