"""What the worker logs: one line per finished task, a startup banner, and nothing at all
unless the host application configured logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import stem
from stem import Retry
from stem.worker import completer as completer_module
from tests.helpers import capture_stem_logs, eventually, running_worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}")


def _task_events(logs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in logs:
        if e["event"] in ("task.succeeded", "task.failed", "task.retried", "task.dead_lettered"):
            out.setdefault(e["event"], []).append(e)
    return out


async def test_one_line_per_finished_task_with_name_id_state_runtime_attempt(
        app: stem.Stem) -> None:
    @app.task(name="log.ok")
    async def ok() -> int:
        return 1

    @app.task(name="log.boom")
    def boom() -> None:
        raise ValueError("nope")

    @app.task(name="log.again", max_retries=1)
    async def again(ctx: stem.TaskContext) -> str:
        if ctx.attempt == 0:
            raise Retry("later", countdown=0)
        return "done"

    with capture_stem_logs() as logs:
        async with running_worker(app):
            ok_id = await app.enqueue("log.ok")
            boom_id = await app.enqueue("log.boom")
            again_id = await app.enqueue("log.again")
            ghost_id = await app.enqueue("log.unknown_task")
            for tid in (ok_id, boom_id, again_id):
                await app.wait(tid, timeout=10)
            await eventually(lambda: _dead(app, ghost_id))
    events = _task_events(logs)
    (succeeded_again, succeeded_ok) = sorted(events["task.succeeded"], key=lambda e: e["task"])
    assert succeeded_ok["task"] == "log.ok" and succeeded_ok["task_id"] == ok_id
    assert succeeded_again["task_id"] == again_id and succeeded_again["attempt"] == 1
    (failed,) = events["task.failed"]
    (retried,) = events["task.retried"]
    (dead,) = events["task.dead_lettered"]
    assert (failed["task"], failed["task_id"], failed["error_type"]) == ("log.boom", boom_id,
                                                                          "ValueError")
    assert (retried["task_id"], retried["attempt"], retried["state"]) == (again_id, 0, "retried")
    assert dead["task_id"] == ghost_id and "log.unknown_task" in dead["reason"]
    for e in (succeeded_ok, succeeded_again, failed, retried):
        assert e["state"] in ("succeeded", "failed", "retried")
        assert isinstance(e["runtime"], float) and 0 <= e["runtime"] < 10
        assert isinstance(e["attempt"], int)
    assert (succeeded_ok["log_level"], failed["log_level"], retried["log_level"],
            dead["log_level"]) == ("info", "warning", "info", "warning")
    # Exactly one line per finished attempt (the retried one finished twice).
    assert sum(len(v) for v in events.values()) == 5


async def _dead(app: stem.Stem, task_id: str) -> bool:
    status = await app.backend.get(task_id)
    return status is not None and status.state.is_terminal


class _Recorder:
    """Stands in for the completer's logger and ``emit``: records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append(name)

    def emit(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(f"emit {args[2]}")


async def test_a_disabled_level_costs_no_logging_call(app: stem.Stem,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    @app.task(name="quiet.ok")
    async def ok() -> int:
        return 1

    @app.task(name="quiet.boom")
    async def boom() -> None:
        raise ValueError("x")

    recorder = _Recorder()
    monkeypatch.setattr(completer_module, "log", recorder)
    monkeypatch.setattr(completer_module, "emit", recorder.emit)
    logger = logging.getLogger("stem")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        async with running_worker(app):
            ok_id, boom_id = await app.enqueue("quiet.ok"), await app.enqueue("quiet.boom")
            ok_result, boom_result = (await app.wait(ok_id, timeout=10),
                                      await app.wait(boom_id, timeout=10))
    finally:
        logger.setLevel(old)
    assert (ok_result.value, boom_result.state) == (1, stem.TaskState.FAILED)
    assert recorder.calls == []
    # The same run with INFO on logs both lines through the same calls.
    logger.setLevel(logging.INFO)
    try:
        async with running_worker(app):
            await app.wait(await app.enqueue("quiet.ok"), timeout=10)
    finally:
        logger.setLevel(old)
    assert recorder.calls == ["emit task.succeeded"]


async def test_worker_started_banner_masks_urls_and_shows_the_pool(
        namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    app = stem.Stem("banner", broker=f"memory://{namespace}",
                    backend="sqlite:///relative/results.db")
    with capture_stem_logs(logging.INFO) as logs:
        async with running_worker(app, concurrency=3, prefetch_multiplier=2,
                                  app_spec="somewhere:app", queues=["a", "b"]):
            pass
    (banner,) = [e for e in logs if e["event"] == "worker.started"]
    assert (banner["app"], banner["namespace"]) == ("somewhere:app", "banner")
    assert banner["broker"] == f"memory://{namespace}"
    assert banner["backend"] == f"sqlite:///{tmp_path / 'relative' / 'results.db'}"
    assert (banner["queues"], banner["concurrency"], banner["prefetch"]) == (["a", "b"], 3, 6)
    assert (banner["pool"], banner["processes"]) == ("thread", 0)
    await app.close()


QUIET_SCRIPT = textwrap.dedent('''
    import asyncio, logging, sys

    # Count what Stem logs without adding a handler: the process stays unconfigured.
    seen = []
    original = logging.Logger.callHandlers

    def counting(self, record):
        if record.name.startswith("stem"):
            seen.append((record.levelno, getattr(record, "stem_event", {}).get("event")))
        return original(self, record)

    logging.Logger.callHandlers = counting

    import stem
    from stem.worker import Worker

    async def main(url):
        app = stem.Stem("quiet", broker=url, backend=url)

        @app.task(name="quiet.boom")
        def boom():
            raise ValueError("boom")

        @app.task(name="quiet.ok")
        async def ok():
            return 1

        ids = [await app.enqueue("quiet.ok"), await app.enqueue("quiet.boom"),
               await app.enqueue("quiet.unknown")]
        worker = Worker(app, block_time=0.05, shutdown_grace=5)
        run = asyncio.create_task(worker.run())
        for tid in ids:
            while True:
                status = await app.backend.get(tid)
                if status is not None and status.state.is_terminal:
                    break
                await asyncio.sleep(0.02)
        worker.request_stop()
        await run
        await app.close()

    asyncio.run(main(sys.argv[1]))
    events = {e for level, e in seen if level >= logging.WARNING}
    assert {"task.failed", "task.dead_lettered"} <= events, seen
    sys.exit(0)
''')


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_process_that_configured_no_logging_prints_nothing(kind: str, tmp_path: Path) -> None:
    """Importing stem, enqueueing and running a worker whose tasks fail and get
    dead-lettered (warnings) writes nothing to stdout or stderr."""
    url = "memory://quiet" if kind == "memory" else f"sqlite:///{tmp_path / 'q.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, url], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
