"""Eager mode: an enqueue runs its task in this process, through the worker's pipeline.

Each envelope makes the trip a worker's does, with the worker's own parts:

- the wire round trip (``to_json`` / ``from_json``): an argument JSON cannot carry or an
  envelope over the payload cap fails the enqueue exactly as a real publish does;
- the ``queued`` status the producer writes (``ResultBackend.add_many``, so an
  explicit ``task_id`` that is already known is skipped, as a real publish skips it);
- :class:`~stem.worker.processor.Processor` (``prepare``: meta checks, deadline,
  argument decoding and conversion; ``success`` / ``failure``: result encoding and the
  retry policy), :class:`~stem.worker.executor.Executor` (isolation and time limits,
  with the process pool replaced by a thread or the loop: tests start no children),
  :class:`~stem.worker.context_ops.WorkerContextOps` (progress, heartbeats, child
  enqueues) and :class:`~stem.worker.completer.Completer` (the statuses and their meta,
  written to the app's backend).

The completer settles through :class:`_EagerBroker`, which keeps what a broker would
be asked to do: a retry's next envelope is run at once (the backoff delay is recorded
in the status meta, never slept), an ack or a dead letter ends the task. ``countdown``
and ``eta`` are not waited for either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, cast

from stem import signals
from stem._time import now_iso
from stem.context import TaskContext
from stem.envelope import Envelope
from stem.errors import TaskFailedError
from stem.ports import Broker, Delivery
from stem.retry import Retry
from stem.status import TaskState, TaskStatus
from stem.task import Isolation, TaskDefinition
from stem.worker.completer import Completer
from stem.worker.context_ops import ContextRuntime, WorkerContextOps
from stem.worker.executor import Executor
from stem.worker.processor import (
    Expired,
    Failure,
    Outcome,
    Processor,
    Rejected,
    RetryLater,
)
from stem.worker.worker import _emit_outcome

if TYPE_CHECKING:
    from stem.app import Stem

#: The ``worker`` key of an eager run's status meta.
EAGER_WORKER_NAME = "eager"


class _EagerExecutor(Executor):
    """The worker's executor without a process pool: what would run in a child runs in a
    thread (``def``) or on the loop (``async def``), with the same time limits."""

    def isolation_for(self, definition: TaskDefinition[Any, Any], hard: float | None
                      ) -> Isolation:
        isolation = super().isolation_for(definition, hard)
        if isolation == "process":
            return "inline" if definition.is_async else "thread"
        return isolation

    def shutdown(self) -> None:
        """Let the thread pool's idle threads go (running ones finish on their own)."""
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False)
            self._thread_pool = None


class _EagerBroker:
    """The settle calls the completer makes, kept instead of sent (no queue exists)."""

    default_visibility_timeout = 30.0

    def __init__(self) -> None:
        self.retries: dict[str, Envelope] = {}
        self.dead: dict[str, str] = {}

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        pass

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        pass

    async def retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        for d, env in items:
            env.to_json()  # a retry the broker could not store fails as it would there
            self.retries[d.receipt] = env

    async def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        for d, reason in items:
            self.dead[d.receipt] = reason

    async def extend_lease(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        pass


class EagerRunner:
    """Runs enqueued envelopes of ``app`` in this process (see the module docstring).

    ``propagate=True`` raises a task's failure from the enqueue: the handler's own
    exception when it raised one, else :class:`~stem.errors.TaskFailedError`.
    """

    def __init__(self, app: Stem, *, propagate: bool = False, threads: int = 4) -> None:
        self.app = app
        self.propagate = propagate
        self.processor = Processor(app)
        self.executor = _EagerExecutor(threads=threads, sender=self)
        self._spawned: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        """Release the thread pool (a later run starts a new one)."""
        self.executor.shutdown()

    async def run(self, envelopes: Sequence[Envelope]) -> None:
        """Write the ``queued`` statuses, then run each new task to its end, in order."""
        app = self.app
        # What a broker stores and a worker reads back: JSON, within the payload cap.
        wire = [Envelope.from_json(env.to_json()) for env in envelopes]
        items = app._queued_items(wire)
        added = await app.backend.add_many([(status, ttl) for _, status, ttl in items])
        for env, _, _ in items:
            if env.id in added:  # a known id is not published again, so not run again
                await self._run_task(env)

    async def _run_task(self, env: Envelope) -> None:
        broker = _EagerBroker()
        completer = Completer(
            cast(Broker, broker),  # only the settle calls are ever made
            self.app.backend, on_settled=lambda receipts: None, stopping=lambda: False,
            sender=self, result_ttl=self.app.result_ttl)
        runtime = ContextRuntime(
            app=self.app, loop=asyncio.get_running_loop(), record_status=completer.status,
            lease_length=lambda d: _lease_length(d), extend_lease=_no_lease,
            spawn=self._spawn, sender=self)
        attempt_env: Envelope | None = env
        while attempt_env is not None:
            attempt_env = await self._attempt(attempt_env, broker, completer, runtime)

    async def _attempt(self, env: Envelope, broker: _EagerBroker, completer: Completer,
                       runtime: ContextRuntime) -> Envelope | None:
        """One attempt, settled and stored; returns the next attempt's envelope, if any."""
        d = Delivery(env, receipt=f"eager:{env.id}:{env.attempt}", queue=env.queue,
                     raw=b"", redelivered=False)
        if signals.task_received.has_receivers:
            signals.task_received.send(self, envelope=env)
        prepared = self.processor.prepare(env)
        if isinstance(prepared, Rejected):
            completer.reject(d, env.id, prepared.reason, prepared.error_type, env,
                             meta=prepared.meta, error_meta=prepared.error_meta)
            await completer.flush_all()
            await self._raise_if_failed(env, None)
            return None
        if isinstance(prepared, Expired):
            meta = {**env.meta, "task": env.name, "queue": env.queue,
                    "worker": EAGER_WORKER_NAME, "expiredAt": now_iso(), "stem.expired": True}
            completer.expired(d, env, meta, prepared.definition.options.result_ttl)
            await completer.flush_all()
            return None
        options = prepared.definition.options
        # The status meta a worker writes (worker.Worker._run), with this runner's name.
        base_meta = {**env.meta, "task": env.name, "queue": env.queue,
                     "worker": EAGER_WORKER_NAME, "startedAt": now_iso()}
        ctx = TaskContext(env, WorkerContextOps(runtime, d, base_meta))
        if signals.task_prerun.has_receivers:
            signals.task_prerun.send(self, envelope=env, context=ctx)
        if options.track_started:
            completer.status(TaskStatus(env.id, TaskState.RUNNING, attempt=env.attempt,
                                        meta=dict(base_meta)), options.result_ttl)
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            value = await self.executor.execute(prepared, ctx)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # what the worker catches: any handler failure
            error = exc
            outcome: Outcome = self.processor.failure(prepared, exc)
        else:
            outcome = self.processor.success(prepared, value)
        completer.outcome(d, prepared, ctx, outcome, base_meta, time.perf_counter() - started)
        await completer.flush_all()
        await self._settle_spawned()
        _emit_outcome(cast(Any, self), env, outcome)  # the worker's signals, sent by us
        if isinstance(outcome, RetryLater):
            next_env = broker.retries.pop(d.receipt, None)
            if next_env is not None:
                return next_env
        if isinstance(outcome, Failure) or d.receipt in broker.dead:
            await self._raise_if_failed(env, error)
        return None

    async def _raise_if_failed(self, env: Envelope, error: BaseException | None) -> None:
        if not self.propagate:
            return
        if isinstance(error, Retry):
            error = error.exc or error
        if isinstance(error, Exception):
            raise error
        status = await self.app.backend.get(env.id)
        if status is not None and status.state is not TaskState.SUCCEEDED:
            raise TaskFailedError(env.id, status.state, status.error)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def _settle_spawned(self) -> None:
        if self._spawned:
            await asyncio.gather(*list(self._spawned), return_exceptions=True)


def _lease_length(d: Delivery) -> float:
    env = d.envelope
    if env is not None and env.visibility_timeout is not None:
        return env.visibility_timeout
    return _EagerBroker.default_visibility_timeout


async def _no_lease(d: Delivery, seconds: float) -> None:
    """Eager tasks hold no lease: there is nothing to extend."""
