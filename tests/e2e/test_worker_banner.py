"""A real ``stem worker start``: its startup banner, per-task lines and ``--log-format``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import stem
from tests.e2e.conftest import ROOT
from tests.helpers import wait_until
from tests.services import start_redis

PASSWORD = "s3cr3t-Banner-pw"


@pytest.fixture(scope="module")
def redis_with_password() -> tuple[str, int]:
    """A throwaway Redis that requires PASSWORD: (URL with the password, port)."""
    _, port = start_redis(extra=["--requirepass", PASSWORD])
    return f"redis://:{PASSWORD}@127.0.0.1:{port}/0", port


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    """The worker's directory and its processes (killed at the end if still running)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield tmp_path, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _start(cwd: Path, log: Path, broker: str, namespace: str, *args: str
           ) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    env.update(PYTHONPATH=str(ROOT), STEM_BROKER_URL=broker, STEM_NAMESPACE=namespace,
               # Relative to the worker's directory: the banner must show it absolute.
               STEM_RESULT_BACKEND_URL="sqlite:///data/results.db",
               E2E_MARK_DIR=str(cwd))
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stem_cli", "worker", "start", "--app",
             "tests.e2e.e2e_app:app", "--block-time", "0.1", "-c", "3", "-Q", "default",
             *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


async def test_banner_and_task_lines_as_json(
        worker: tuple[Path, list[subprocess.Popen[bytes]]], redis_with_password: tuple[str, int],
        namespace: str) -> None:
    cwd, procs = worker
    url, port = redis_with_password
    log = cwd / "worker.log"
    # stderr is a file, not a terminal: --log-format auto means JSON lines.
    procs.append(proc := _start(cwd, log, url, namespace, "--prefetch-multiplier", "2"))

    def events() -> list[dict[str, object]]:
        return [orjson.loads(line) for line in log.read_bytes().splitlines()
                if line.startswith(b"{")]

    banner = wait_until(lambda: next((e for e in events() if e["event"] == "worker.started"),
                                     None), timeout=30)
    assert banner["level"] == "info"
    assert banner["app"] == "tests.e2e.e2e_app:app"
    assert banner["namespace"] == namespace  # STEM_NAMESPACE beats the app's name
    assert banner["broker"] == f"redis://:***@127.0.0.1:{port}/0"
    assert banner["backend"] == f"sqlite:///{cwd / 'data' / 'results.db'}"
    assert Path(str(banner["backend"]).removeprefix("sqlite:///")).is_absolute()
    assert (banner["queues"], banner["concurrency"], banner["prefetch"]) == (["default"], 3, 6)
    assert (banner["pool"], banner["processes"]) == ("thread", 0)

    producer = stem.Stem("producer", broker=url, backend=f"sqlite:///{cwd / 'data/results.db'}",
                         namespace=namespace)
    try:
        tid = await producer.enqueue("e2e.add", x=1, y=2)
        assert (await producer.wait(tid, timeout=20)).value == 3
    finally:
        await producer.close()
    line = wait_until(lambda: next((e for e in events() if e["event"] == "task.succeeded"), None))
    assert (line["task"], line["task_id"], line["state"], line["attempt"]) == (
        "e2e.add", tid, "succeeded", 0)
    assert isinstance(line["runtime"], float)
    _stop(proc)
    assert PASSWORD not in log.read_text()


def test_banner_pretty_masks_the_password_and_shows_the_absolute_sqlite_path(
        worker: tuple[Path, list[subprocess.Popen[bytes]]], redis_with_password: tuple[str, int],
        namespace: str) -> None:
    cwd, procs = worker
    url, port = redis_with_password
    log = cwd / "worker.log"
    procs.append(proc := _start(cwd, log, url, namespace, "--log-format", "pretty",
                                "--pool", "1"))
    line = wait_until(lambda: next((x for x in log.read_text().splitlines()
                                    if "worker.started" in x), None), timeout=60)
    assert not line.lstrip().startswith("{")
    assert f"redis://:***@127.0.0.1:{port}/0" in line
    assert f"sqlite:///{cwd / 'data' / 'results.db'}" in line
    assert "tests.e2e.e2e_app:app" in line
    assert "pool=process" in line and "processes=1" in line
    _stop(proc)
    assert PASSWORD not in log.read_text()


def test_unknown_log_format_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "stem_cli", "worker", "start", "--app",
                          "tests.e2e.e2e_app:app", "--log-format", "xml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("stem: error:") and "--log-format" in out.stderr
    assert "auto, pretty, json" in out.stderr
