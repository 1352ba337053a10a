"""A real ``stem worker start --metrics-port --pool 1``: the endpoint counts the tasks the
pool's children ran, per task and queue, and the app's signals fire in order."""

from __future__ import annotations

import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.observe_app import app, fail, square
from tests.helpers import WorkerProcesses, wait_until

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_and_signals_of_a_worker_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    log = tmp_path / "signals.log"
    port = _free_port()
    workers = WorkerProcesses(tmp_path)
    env = {"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": "", "OBS_SIGNAL_LOG": str(log)}
    # The producer side (this process) uses the worker's SQLite file too.
    monkeypatch.setattr(app, "broker_url", url)
    monkeypatch.setattr(app, "backend_url", url)
    try:
        ids = [square.delay(i) for i in range(5)]
        bad = fail.delay()
        proc = workers.start("tests.e2e.observe_app:app", "--pool", "1", "--metrics-port",
                             str(port), "-Q", "numbers", "-Q", "default", env=env)
        for i in ids:
            assert app.wait_sync(i, timeout=30).state.value == "succeeded"
        assert app.wait_sync(bad, timeout=30).state.value == "failed"
        m = wait_until(lambda: _scrape(port), timeout=15)
        labels = (("queue", "numbers"), ("task", "obs.square"))
        assert m[("stem_tasks_started_total", labels)] == 5
        assert m[("stem_tasks_succeeded_total", labels)] == 5
        assert m[("stem_task_duration_seconds_count", labels)] == 5
        fail_labels = (("queue", "default"), ("task", "obs.fail"))
        assert m[("stem_tasks_failed_total", fail_labels)] == 1
        assert m.get(("stem_tasks_failed_total", labels), 0) == 0
        assert m[("stem_worker_concurrency", ())] == 16
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        workers.kill_all()
        app.close_sync()
    lines = [line.split() for line in log.read_text().splitlines()]
    worker_events = [n for n, _ in lines if n.startswith("worker_")]
    assert worker_events == ["worker_init", "worker_ready", "worker_stopping",
                             "worker_shutdown"]
    for task_id, outcome in [*((i, "task_succeeded") for i in ids), (bad, "task_failed")]:
        assert [n for n, t in lines if t == task_id] == [
            "task_received", "task_prerun", outcome, "task_postrun"]
