"""The app of the observability process test: signal receivers write one line per event
to ``$OBS_SIGNAL_LOG`` (``name task-id``)."""

from __future__ import annotations

import os
from typing import Any

import stem

app = stem.Stem("obs")


def _log(name: str) -> Any:
    def receiver(sender: Any, **kw: Any) -> None:
        env = kw.get("envelope")
        with open(os.environ["OBS_SIGNAL_LOG"], "a") as fh:
            fh.write(f"{name} {env.id if env is not None else '-'}\n")
    return receiver


for _name in ("worker_init", "worker_ready", "worker_stopping", "worker_shutdown",
              "task_received", "task_prerun", "task_succeeded", "task_failed", "task_postrun"):
    getattr(app.signals, _name).connect(_log(_name))


@app.task(name="obs.square", queue="numbers")
def square(x: int) -> int:  # a def task: run by the --pool children
    return x * x


@app.task(name="obs.fail", max_retries=0)
async def fail() -> None:
    raise RuntimeError("expected")
