"""Lifecycle signals: connect a receiver to observe tasks, workers, beats and producers.

Receivers are plain callables (sync or async) called as ``receiver(sender, **payload)``.
A receiver that raises is logged and skipped: observers never break task processing.
Signals are sent on the worker's (or the beat's, or the producer's) event loop; an async
receiver is scheduled there as a task (not awaited).

Two scopes, one set of names (docs/observability.md, "Signals"):

- ``stem.signals.task_retry`` (module level) hears every app in the process;
- ``app.signals.task_retry`` hears only what ``app``'s workers, beats and producers do,
  so two apps in one process never see each other's events.

    @stem.signals.task_retry.connect
    def on_retry(sender, *, envelope, error, delay, **_):
        ...

    @app.signals.task_failed.connect(sender="billing.charge")   # one task only
    async def on_failed(sender, *, envelope, error, **_):
        ...

``sender=`` filters: a receiver connected with it is called only when the signal's
sender is that object, or when the payload's ``envelope`` is of that task (a task name
or a task definition). ``STEM_SIGNALS_DISABLED`` (the Dart Stem's kebab names,
``worker-heartbeat,task-prerun``) and ``STEM_SIGNALS_ENABLED=false`` switch signals off;
:func:`configure` does the same from code.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any, overload

from stem.log import get_logger

log = get_logger(__name__)

Receiver = Callable[..., Any]
_ANY: Any = object()  # a receiver without a sender filter


def _matches(filter_: Any, sender: Any, kwargs: dict[str, Any]) -> bool:
    if filter_ is _ANY or filter_ is sender:
        return True
    env = kwargs.get("envelope")
    if env is None:
        return False
    name = filter_ if isinstance(filter_, str) else getattr(filter_, "name", None)
    return isinstance(name, str) and getattr(env, "name", None) == name


def _scope_of(sender: Any) -> AppSignals | None:
    """The :class:`AppSignals` of the app ``sender`` works for (an app, or anything with
    an ``app`` attribute: a worker, a beat, an eager runner)."""
    scope = getattr(sender, "signals", None)
    if isinstance(scope, AppSignals):
        return scope
    scope = getattr(getattr(sender, "app", None), "signals", None)
    return scope if isinstance(scope, AppSignals) else None


class Signal:
    """A named hook. ``connect`` returns the receiver so it works as a decorator.

    ``name`` is the Python attribute name, ``event`` the Dart Stem's kebab name (what
    ``STEM_SIGNALS_DISABLED`` lists). A module-level signal is sent by Stem's code;
    an app's signal (``app.signals.<name>``, with ``parent`` set) only collects
    receivers, which the module-level one calls when the sender belongs to that app.
    """

    def __init__(self, name: str, doc: str = "", *, event: str | None = None,
                 parent: Signal | None = None) -> None:
        self.name = name
        self.event = event or name.replace("_", "-")
        self.__doc__ = doc
        self._parent = parent
        self._receivers: list[tuple[Receiver, Any]] = []
        #: Receivers here plus those of every app's copy (module-level signals only):
        #: what the hot paths' ``has_receivers`` looks at.
        self._count = 0
        #: Off when listed in STEM_SIGNALS_DISABLED (or all signals are disabled).
        self.enabled = True

    def __repr__(self) -> str:
        return f"<Signal {self.name}>"

    @overload
    def connect(self, receiver: Receiver, /, *, sender: Any = ...) -> Receiver: ...
    @overload
    def connect(self, receiver: None = None, /, *, sender: Any = ...
                ) -> Callable[[Receiver], Receiver]: ...

    def connect(self, receiver: Receiver | None = None, /, *, sender: Any = _ANY) -> Any:
        """Call ``receiver(sender, **payload)`` whenever this signal is sent.

        With ``sender=``, only when the sender is that object or the payload's envelope
        is of that task (a name or a definition). Without ``receiver``, a decorator.
        """
        if receiver is None:
            return lambda fn: self.connect(fn, sender=sender)
        if not any(r == receiver and f is sender for r, f in self._receivers):
            self._receivers.append((receiver, sender))
            self._bump(1)
        return receiver

    def disconnect(self, receiver: Receiver) -> None:
        """Stop calling ``receiver`` (whatever sender filter it was connected with)."""
        kept = [(r, f) for r, f in self._receivers if r != receiver]
        self._bump(len(kept) - len(self._receivers))
        self._receivers = kept

    def _bump(self, n: int) -> None:
        self._count += n
        if self._parent is not None:
            self._parent._count += n

    @property
    def has_receivers(self) -> bool:
        """True when anyone listens (lets hot paths skip building arguments)."""
        return self._count > 0 and (self._parent or self).enabled

    def send(self, sender: Any, **kwargs: Any) -> None:
        """Call the receivers of the sender's app (see the module docstring), then the
        module-level ones; async receivers are scheduled on the running loop."""
        if not self._count or not (self._parent or self).enabled:
            return
        if self._parent is not None:  # sent on an app's copy: that app's, then everyone's
            self._call(self._receivers, sender, kwargs)
            self._parent._call(self._parent._receivers, sender, kwargs)
            return
        if self._count != len(self._receivers):  # some app listens: is it the sender's?
            scope = _scope_of(sender)
            if scope is not None:
                own = scope._signals.get(self.name)
                if own is not None and own._receivers:
                    self._call(own._receivers, sender, kwargs)
        self._call(self._receivers, sender, kwargs)

    def _call(self, receivers: list[tuple[Receiver, Any]], sender: Any,
              kwargs: dict[str, Any]) -> None:
        for receiver, filter_ in list(receivers):
            if filter_ is not _ANY and not _matches(filter_, sender, kwargs):
                continue
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


def _s(name: str, doc: str, event: str | None = None) -> Signal:
    sig = Signal(name, doc, event=event)
    _ALL[name] = sig
    return sig


_ALL: dict[str, Signal] = {}

# -- producer --------------------------------------------------------------------------
before_task_publish = _s(
    "before_task_publish",
    "Envelopes are about to be published (sender: the app; envelope=). Right before the "
    "broker call; the envelope may still be changed (headers, meta) unless it is signed.")
after_task_publish = _s(
    "after_task_publish",
    "An envelope was published and its queued status written (sender: the app; envelope=, "
    "task_id= the id enqueue returned: the pending task's for a deduplicated unique call).")
# -- tasks (sender: the worker) ----------------------------------------------------------
task_received = _s("task_received", "A delivery was fetched (envelope=).")
task_prerun = _s("task_prerun", "A handler is about to run (envelope=, context=).")
task_postrun = _s("task_postrun", "A handler finished (envelope=, state=: succeeded, "
                  "retried or failed).")
task_success = _s("task_success", "A task succeeded (envelope=, result=).", "task-succeeded")
task_retry = _s("task_retry", "A task will be retried (envelope=, error=, delay=).")
task_failure = _s("task_failure", "A task failed for good (envelope=, error=).", "task-failed")
task_revoked = _s(
    "task_revoked",
    "A revoked task was cancelled without running, or stopped by a terminate revoke "
    "(envelope=, entry=, reason=, terminated=).")
task_rejected = _s("task_rejected", "A delivery was dead-lettered (reason=, envelope=, raw=).")
task_progress = _s("task_progress", "A task reported progress (envelope=, percent=, data=).")
task_timeout = _s(
    "task_timeout",
    "A task passed its soft time limit (envelope=, limit=, hard=False) or hard limit (hard=True).",
)
# -- workers (sender: the worker) ----------------------------------------------------------
worker_init = _s("worker_init", "A worker was created (sender: Worker).")
worker_ready = _s("worker_ready", "A worker connected and starts fetching.")
worker_stopping = _s("worker_stopping", "A worker stops fetching and drains (in_flight=).")
worker_shutdown = _s("worker_shutdown", "A worker finished draining and stops.")
worker_heartbeat = _s(
    "worker_heartbeat",
    "A running worker's periodic beat (in_flight=, prefetched=, processed=, queues=).")
# -- beat (sender: the Beat) ---------------------------------------------------------------
schedule_entry_due = _s(
    "schedule_entry_due", "A beat found a schedule entry due (entry=, scheduled_at=).")
schedule_entry_dispatched = _s(
    "schedule_entry_dispatched",
    "A beat enqueued a schedule entry's task (entry=, task_id=, scheduled_at=, executed_at=, "
    "drift_ms=).")
schedule_entry_failed = _s(
    "schedule_entry_failed", "A beat could not dispatch a schedule entry (entry=, error=).")
# -- control plane (sender: the worker) ----------------------------------------------------
control_command_received = _s(
    "control_command_received",
    "A worker received a control command (command=, payload=, message=).")
control_command_completed = _s(
    "control_command_completed",
    "A worker answered a control command (command=, payload=, message=, status=, reply=).")

#: The Dart Stem's names for two signals (the same objects).
task_succeeded = task_success
task_failed = task_failure


class AppSignals:
    """``app.signals``: one copy of every signal that hears only this app.

    ``app.signals.task_failed.connect(fn)`` calls ``fn`` for this app's tasks alone;
    the module-level ``stem.signals.task_failed`` keeps hearing every app.
    """

    def __init__(self) -> None:
        self._signals = {name: Signal(name, sig.__doc__ or "", event=sig.event, parent=sig)
                         for name, sig in _ALL.items()}
        # When the app goes, its receivers stop counting as listeners of the module-level
        # signals (whose has_receivers the hot paths check).
        weakref.finalize(self, _release, list(self._signals.values()))

    def __getattr__(self, name: str) -> Signal:
        aliases = {"task_succeeded": "task_success", "task_failed": "task_failure"}
        try:
            return self.__dict__["_signals"][aliases.get(name, name)]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self) -> Any:
        return iter(self._signals.values())


def _release(copies: list[Signal]) -> None:
    for sig in copies:
        if sig._parent is not None:
            sig._parent._count -= len(sig._receivers)


def all_signals() -> list[Signal]:
    """Every module-level signal, in the order of docs/observability.md."""
    return list(_ALL.values())


def _names(signal: Signal) -> set[str]:
    return {signal.event, signal.name.replace("_", "-"), signal.name}


def configure(*, enabled: bool | None = None, disabled: Iterable[str] | None = None) -> None:
    """Switch signals on or off for the process (every app).

    ``enabled=False`` disables all; ``disabled`` lists the ones to switch off by Dart
    kebab name (``task-succeeded``) or Python name (``task_success``); the others are on.
    Without arguments: read ``STEM_SIGNALS_ENABLED`` / ``STEM_SIGNALS_DISABLED`` again.
    """
    if enabled is None and disabled is None:
        raw = os.environ.get("STEM_SIGNALS_ENABLED", "true").strip().lower()
        if raw not in {"true", "1", "yes", "false", "0", "no", ""}:
            log.warning("signals.bad_setting", STEM_SIGNALS_ENABLED=raw)
        enabled = raw not in {"false", "0", "no"}
        disabled = os.environ.get("STEM_SIGNALS_DISABLED", "").split(",")
    off = {n.strip().lower() for n in (disabled or ()) if n.strip()}
    known: set[str] = set()
    for sig in _ALL.values():
        names = _names(sig)
        known |= names
        sig.enabled = enabled is not False and not (names & off)
    for unknown in sorted(off - known):
        log.warning("signals.unknown_name", name=unknown)


configure()

__all__ = [
    "AppSignals",
    "Signal",
    "after_task_publish",
    "all_signals",
    "before_task_publish",
    "configure",
    "control_command_completed",
    "control_command_received",
    "schedule_entry_dispatched",
    "schedule_entry_due",
    "schedule_entry_failed",
    "task_failed",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_progress",
    "task_received",
    "task_rejected",
    "task_retry",
    "task_revoked",
    "task_succeeded",
    "task_success",
    "task_timeout",
    "worker_heartbeat",
    "worker_init",
    "worker_ready",
    "worker_shutdown",
    "worker_stopping",
]
