"""Lifecycle signals: connect a receiver to observe tasks and workers.

Receivers are plain callables (sync or async) taking keyword arguments. A receiver
that raises is logged and skipped: observers never break task processing. Signals
are sent on the worker's (or the beat's) event loop.

    @stem.signals.task_retry.connect
    def on_retry(sender, *, envelope, error, delay, **_):
        ...
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from stem.log import get_logger

log = get_logger(__name__)

Receiver = Callable[..., Any]


class Signal:
    """A named hook. ``connect`` returns the receiver so it works as a decorator."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.__doc__ = doc
        self._receivers: list[Receiver] = []

    def __repr__(self) -> str:
        return f"<Signal {self.name}>"

    def connect(self, receiver: Receiver) -> Receiver:
        """Call ``receiver(sender, **kwargs)`` whenever this signal is sent."""
        if receiver not in self._receivers:
            self._receivers.append(receiver)
        return receiver

    def disconnect(self, receiver: Receiver) -> None:
        """Stop calling ``receiver``."""
        if receiver in self._receivers:
            self._receivers.remove(receiver)

    @property
    def has_receivers(self) -> bool:
        """True when anyone listens (lets hot paths skip building arguments)."""
        return bool(self._receivers)

    def send(self, sender: Any, **kwargs: Any) -> None:
        """Call every receiver; async receivers are scheduled on the running loop."""
        for receiver in list(self._receivers):
            try:
                result = receiver(sender, **kwargs)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    task.add_done_callback(self._log_async_failure)
            except Exception as exc:
                log.warning("signal.receiver_failed", signal=self.name, error=repr(exc))

    def _log_async_failure(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("signal.receiver_failed", signal=self.name, error=repr(task.exception()))


worker_init = Signal("worker_init", "A worker was created (sender: Worker).")
worker_ready = Signal("worker_ready", "A worker connected and starts fetching.")
worker_shutdown = Signal("worker_shutdown", "A worker finished draining and stops.")
task_received = Signal("task_received", "A delivery was fetched (envelope=).")
task_prerun = Signal("task_prerun", "A handler is about to run (envelope=, context=).")
task_postrun = Signal("task_postrun", "A handler finished (envelope=, state=).")
task_success = Signal("task_success", "A task succeeded (envelope=, result=).")
task_retry = Signal("task_retry", "A task will be retried (envelope=, error=, delay=).")
task_failure = Signal("task_failure", "A task failed for good (envelope=, error=).")
task_rejected = Signal("task_rejected", "A delivery was dead-lettered (reason=, envelope=).")
task_progress = Signal("task_progress", "A task reported progress (envelope=, percent=, data=).")
task_timeout = Signal(
    "task_timeout",
    "A task passed its soft time limit (envelope=, limit=, hard=False) or hard limit (hard=True).",
)
schedule_entry_due = Signal(
    "schedule_entry_due", "A beat found a schedule entry due (entry=, scheduled_at=).")
schedule_entry_dispatched = Signal(
    "schedule_entry_dispatched",
    "A beat enqueued a schedule entry's task (entry=, task_id=, scheduled_at=, executed_at=, "
    "drift_ms=).")
schedule_entry_failed = Signal(
    "schedule_entry_failed", "A beat could not dispatch a schedule entry (entry=, error=).")

__all__ = [
    "Signal",
    "schedule_entry_dispatched",
    "schedule_entry_due",
    "schedule_entry_failed",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_progress",
    "task_received",
    "task_rejected",
    "task_retry",
    "task_success",
    "task_timeout",
    "worker_init",
    "worker_ready",
    "worker_shutdown",
]
