"""Operating Stem: `stem observe`, long DLQ replays, `stem worker multi` and healthcheck,
and a worker that waits for a broker started after it (real processes)."""

from __future__ import annotations

import http.server
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import stem
from stem.envelope import Envelope
from tests.e2e.test_cli import run_stem
from tests.helpers import WorkerProcesses, wait_until
from tests.services import _free_port, start_redis

pytestmark = pytest.mark.slow


def _json_lines(out: str) -> list[object]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


async def test_observe_commands_print_json(sqlite_url: str, tmp_path: Path) -> None:
    app = stem.Stem(broker=sqlite_url, backend=sqlite_url)  # namespace "stem", as the CLI's
    await app.broker.publish([Envelope(name="e2e.add", args={"x": 1, "y": 2}) for _ in range(3)])
    [d] = await app.broker.fetch(["default"], 1, block=1, consumer="t")
    await app.broker.dead_letter([(d, "unknown task 'e2e.add'")])
    await app.close()
    env = {"STEM_BROKER_URL": sqlite_url, "STEM_SCHEDULE_FILE": str(tmp_path / "none.json")}

    watched = run_stem("observe", "queues", "--json", "--watch", "--count", "2",
                       "--interval", "0.1", env=env)
    assert watched.returncode == 0, watched.stderr
    assert _json_lines(watched.stdout) == [
        {"queue": "default", "pending": 2, "delayed": 0, "inFlight": 0, "dead": 1}] * 2

    dlq = run_stem("observe", "dlq", "--json", env=env)
    [doc] = _json_lines(dlq.stdout)
    assert isinstance(doc, dict) and doc["queues"] == {"default": 1}
    assert [(x["id"], x["task"], x["reason"]) for x in doc["letters"]] == [
        (d.envelope.id, "e2e.add", "unknown task 'e2e.add'")]

    workers = run_stem("observe", "workers", "--json", env=env)
    [w] = _json_lines(workers.stdout)
    assert isinstance(w, dict) and w["source"] == "broker" and "heartbeats" in w["note"]
    assert w["queues"] == [{"queue": "default", "inFlight": 0, "pending": 2}]

    metrics = run_stem("observe", "metrics", "--json", env=env)
    [samples] = _json_lines(metrics.stdout)
    assert {"name": "stem_queue_depth", "labels": {"queue": "default"}, "value": 2.0} in samples
    assert {"name": "stem_queue_dead_letters", "labels": {"queue": "default"},
            "value": 1.0} in samples

    schedules = run_stem("observe", "schedules", "--json", env=env)
    assert schedules.returncode == 0, schedules.stderr
    [sched] = _json_lines(schedules.stdout)
    assert sched == {"summary": {"entries": 0, "enabled": 0, "due": 0, "overdue": 0,
                                 "maxDriftMs": None}, "entries": []}

    table = run_stem("observe", "queues", env=env)
    assert "in flight" in table.stdout and "default" in table.stdout


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    body = (b'# HELP stem_tasks_succeeded_total Tasks that succeeded.\n'
            b'# TYPE stem_tasks_succeeded_total counter\n'
            b'stem_tasks_succeeded_total{task="e2e.add",queue="default"} 7\n'
            b'stem_tasks_succeeded_total{task="e2e.echo",queue="default"} 2\n'
            b'stem_worker_concurrency 16\n')

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()


def test_observe_metrics_scrapes_an_endpoint(metrics_endpoint: str) -> None:
    out = run_stem("observe", "metrics", "--url", metrics_endpoint, "--match", "succeeded",
                   "--json")
    assert out.returncode == 0, out.stderr
    [samples] = _json_lines(out.stdout)
    assert samples == [
        {"name": "stem_tasks_succeeded_total", "labels": {"task": "e2e.add", "queue": "default"},
         "value": 7.0},
        {"name": "stem_tasks_succeeded_total", "labels": {"task": "e2e.echo", "queue": "default"},
         "value": 2.0}]
    table = run_stem("observe", "metrics", "--url", metrics_endpoint)
    assert "stem_worker_concurrency" in table.stdout and "16" in table.stdout
    down = run_stem("observe", "metrics", "--url", f"http://127.0.0.1:{_free_port()}/metrics")
    assert down.returncode == 1 and "stem: error: scraping" in down.stderr


async def test_dlq_replay_of_more_than_one_batch(sqlite_url: str) -> None:
    from stem_cli.ops import REPLAY_BATCH

    n = REPLAY_BATCH + 123
    app = stem.Stem(broker=sqlite_url, backend=sqlite_url)
    await app.broker.publish([Envelope(name="e2e.add", args={"x": i, "y": 0}) for i in range(n)])
    got = await app.broker.fetch(["default"], n, block=1, consumer="t")
    assert len(got) == n
    await app.broker.dead_letter([(d, "boom") for d in got])
    env = {"STEM_BROKER_URL": sqlite_url}
    out = run_stem("dlq", "replay", "--yes", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"default: replayed {n}"
    stats = await app.broker.stats("default")
    assert (stats.pending, stats.dead) == (n, 0)
    await app.close()


def test_worker_multi_starts_reports_and_stops_two_nodes(sqlite_url: str, marks: Path,
                                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"STEM_BROKER_URL": sqlite_url, "E2E_MARK_DIR": str(marks)}
    common = ["--dir", str(run_dir)]
    pids: list[int] = []
    try:
        started = run_stem("worker", "multi", "start", "alpha", "beta", *common,
                           "--app", "tests.e2e.e2e_app:app", "--worker-args",
                           "--block-time 0.1 --concurrency 2", env=env)
        assert started.returncode == 0, started.stderr
        pids = [int((run_dir / f"{n}.pid").read_text()) for n in ("alpha", "beta")]
        assert f"alpha: started (pid {pids[0]})" in started.stdout

        status = run_stem("worker", "multi", "status", "alpha", "beta", *common)
        assert status.returncode == 0, status.stdout
        assert status.stdout.splitlines() == [f"alpha: running (pid {pids[0]}).",
                                              f"beta: running (pid {pids[1]})."]
        health = run_stem("worker", "healthcheck", "--pidfile", str(run_dir / "alpha.pid"),
                          "--json")
        assert health.returncode == 0
        report = orjson.loads(health.stdout)
        assert (report["status"], report["node"], report["pid"]) == ("ok", "alpha", pids[0])
        # the nodes are real workers: one of them runs a task, logging to its log file
        wait_until(lambda: all("worker.started" in (run_dir / f"{n}.log").read_text()
                               for n in ("alpha", "beta")), timeout=30)
        stopped = run_stem("worker", "multi", "stop", "alpha", "beta", *common, "--timeout", "20")
        assert stopped.returncode == 0, stopped.stderr
        assert sorted(stopped.stdout.splitlines()) == [f"alpha: stopped (pid {pids[0]}).",
                                                       f"beta: stopped (pid {pids[1]})."]
        after = run_stem("worker", "multi", "status", "alpha", "beta", *common)
        assert after.returncode == 3
        assert "alpha: not running (no PID file)." in after.stdout
        gone = run_stem("worker", "healthcheck", "--pidfile", str(run_dir / "alpha.pid"),
                        "--json")
        assert gone.returncode == 70 and orjson.loads(gone.stdout)["error"] == "pidfile-missing"
        assert "worker.stopped" in (run_dir / "alpha.log").read_text()
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_multi_status_removes_a_stale_pid_file_and_healthcheck_needs_a_pidfile(
        tmp_path: Path) -> None:
    (tmp_path / "ghost.pid").write_text("999999999\n")
    out = run_stem("worker", "multi", "status", "ghost", "--dir", str(tmp_path))
    assert out.returncode == 3 and "ghost: not running (stale pid 999999999)." in out.stdout
    assert not (tmp_path / "ghost.pid").exists()
    assert run_stem("worker", "healthcheck").returncode == 64


async def test_worker_waits_for_a_broker_that_starts_late(tmp_path: Path, marks: Path) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    workers = WorkerProcesses(tmp_path)
    proc = workers.start("tests.e2e.e2e_app:app", "--connect-timeout", "60",
                         "--log-format", "json",
                         env={"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "",
                              "E2E_MARK_DIR": str(marks), "STEM_NAMESPACE": "late"})
    log = tmp_path / "worker-0.log"
    try:
        wait_until(lambda: "worker.waiting_for_store" in log.read_text(), timeout=30)
        assert proc.poll() is None
        start_redis(port)
        app = stem.Stem("late", broker=url, backend=url)
        result = await app.wait(await app.enqueue("e2e.add", x=2, y=3), timeout=30)
        assert result.value == 5
        await app.close()
        text = log.read_text()
        assert "worker.store_reachable" in text and "worker.started" in text
    finally:
        workers.kill_all()
