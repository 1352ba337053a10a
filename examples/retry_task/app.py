"""A flaky task and signal receivers that print every retry: attempt, delay, next run.

The worker that runs this app prints one line per retry, per success and per failure.
The broker is ``STEM_BROKER_URL`` (compose sets Redis), else an SQLite file: no server.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import stem
from stem import signals

app = stem.Stem("retry_demo", broker=os.environ.get("STEM_BROKER_URL")
                or "sqlite:///.stem/retry_demo.db")

#: The task fails on its first FAILURES attempts (a flaky payment gateway).
FAILURES = int(os.environ.get("RETRY_DEMO_FAILURES", "3"))


@app.task(name="retry_demo.charge", max_retries=4,
          retry_strategy=stem.ExponentialJitterRetryStrategy(base=0.5, jitter=False))
def charge(ctx: stem.TaskContext, order_id: int) -> str:
    """Fails FAILURES times, then succeeds: each failure is retried 0.5 s, 1 s, 2 s later."""
    if ctx.attempt < FAILURES:
        raise ConnectionError(f"gateway timed out (attempt {ctx.attempt})")
    return f"order {order_id} charged on attempt {ctx.attempt}"


def _now() -> datetime:
    return datetime.now(UTC)


@signals.task_retry.connect
def on_retry(sender: Any, *, envelope: Any, error: Any, delay: float, **_: Any) -> None:
    """Every retry: which attempt failed, why, how long until the next and when that is."""
    next_run = (_now() + timedelta(seconds=delay)).strftime("%H:%M:%S.%f")[:-3]
    print(f"retry: {envelope.name} attempt={envelope.attempt} failed ({error}); "
          f"delay={delay:.2f}s next run at {next_run} UTC", flush=True)


@signals.task_success.connect
def on_success(sender: Any, *, envelope: Any, result: Any, **_: Any) -> None:
    print(f"success: {envelope.name} attempt={envelope.attempt} -> {result!r}", flush=True)


@signals.task_failure.connect
def on_failure(sender: Any, *, envelope: Any, error: Any, **_: Any) -> None:
    print(f"failure: {envelope.name} attempt={envelope.attempt} gave up ({error})", flush=True)
