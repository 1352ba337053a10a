"""The completer: turns task outcomes into stored statuses, acks, retries and dead letters.

Outcomes are collected and flushed once per loop tick: statuses first (results are
written before the ack), then acks, retry re-publishes and dead letters, in parallel.
Flushes never overlap, so a later status for the same task always lands after an
earlier one. If the result backend is down, the batch is retried with backoff and
nothing is acked until its statuses are stored.

It knows nothing of the worker: it is given the broker and backend, the store that
can ack with results atomically (if any), a callback for the receipts it settled and
a way to ask whether the worker is stopping (:class:`Completer`).

Each finished task is logged once here (``task.succeeded`` / ``task.retried`` at
INFO, ``task.failed`` / ``task.dead_lettered`` / ``task.expired`` at WARNING: work
asked for that did not get done) with the task name, id,
resulting state, attempt and runtime (seconds the handler ran); when the level is
disabled that costs one ``isEnabledFor`` check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from stem import metrics, signals
from stem._time import now_iso
from stem.context import TaskContext
from stem.encoding import RESULT_ENCODER_META
from stem.envelope import Envelope
from stem.errors import EnvelopeDecodeError
from stem.log import emit, get_logger
from stem.ports import AtomicAckStore, Broker, Delivery, LockStore, ResultBackend
from stem.status import TaskError, TaskState, TaskStatus
from stem.task import META_EXPIRES_AT, META_IGNORE_RESULT
from stem.unique import META_UNIQUE_KEY, META_UNIQUE_OWNER, lock_key
from stem.worker.processor import Failure, Outcome, Prepared, RetryLater, Success

log = get_logger(__name__)
#: The stdlib logger behind ``log``, for the per-task lines: its ``isEnabledFor`` is the
#: cheap level check, and :func:`stem.log.emit` writes the line without structlog's chain.
_stdlog = logging.getLogger(__name__)
_INFO, _WARNING = logging.INFO, logging.WARNING


class Completer:
    """Collects outcomes and flushes them once per loop tick (see the module docstring).

    ``on_settled(receipts)`` is called with the receipts of every delivery that was
    settled (acked, retried or dead-lettered; also when that call failed — the lease
    then brings the task back). ``stopping()`` tells whether the worker is shutting
    down: settle calls that fail then are counted in :attr:`lost_settles`. ``sender``
    is what ``task_rejected`` signals are sent by (the worker).

    A rejected delivery (unknown task, bad arguments, undecodable) records a FAILED
    status only when the store holds no terminal status for that id: a bogus or stale
    envelope reusing a finished task's id must not overwrite its result. The check is
    one ``get_many`` per flush that has rejects (rare), so another attempt finishing
    between that read and our write can still be overwritten — a window of one
    round-trip, accepted to keep the common path free of extra reads.
    """

    def __init__(
        self,
        broker: Broker,
        backend: ResultBackend,
        *,
        on_settled: Callable[[Sequence[str]], None],
        stopping: Callable[[], bool],
        atomic_ack: AtomicAckStore | None = None,
        sender: Any = None,
        result_ttl: float | None = None,
        unique_locks: Callable[[], LockStore] | None = None,
    ) -> None:
        #: Where unique tasks' locks are released once they end (resolved on first use).
        self._unique_locks = unique_locks
        self._unlock: list[tuple[str, str]] = []
        #: TTL of statuses whose task sets none (the app's ``result_ttl``; None: the
        #: backend's default).
        self._result_ttl = result_ttl
        self._broker = broker
        self._backend = backend
        self._on_settled = on_settled
        self._stopping = stopping
        self._atomic_ack = atomic_ack
        self._sender = sender if sender is not None else self
        self._statuses: dict[str, tuple[TaskStatus, float | None]] = {}
        self._reject_statuses: dict[str, TaskStatus] = {}
        self._acks: list[Delivery] = []
        self._retries: list[tuple[Delivery, Envelope]] = []
        self._dead: list[tuple[Delivery, str]] = []
        #: Receipts with an outcome queued or being written (not settled yet).
        self.pending_receipts: set[str] = set()
        #: Deliveries whose settle call failed while the worker was stopping.
        self.lost_settles = 0
        self._scheduled = False
        self._flushing: asyncio.Task[None] | None = None

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        self._scheduled = False
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())

    def status(self, status: TaskStatus, ttl: float | None) -> None:
        """Queue a status write (RUNNING, progress) for the next flush."""
        if ttl is None:
            ttl = self._result_ttl
        existing = self._statuses.get(status.id)
        # Never let a late progress/running write overwrite a terminal one in the same batch.
        if existing is not None and existing[0].state.is_terminal and not status.state.is_terminal:
            return
        self._statuses[status.id] = (status, ttl)
        self._schedule()

    def ack_only(self, d: Delivery) -> None:
        """Ack ``d`` without writing anything (a duplicate of a finished task)."""
        self._acks.append(d)
        self.pending_receipts.add(d.receipt)
        self._schedule()

    def expired(self, d: Delivery, env: Envelope, meta: dict[str, Any],
                ttl: float | None) -> None:
        """Settle a delivery past its deadline: store CANCELLED (``TaskExpired``), then ack.

        Neither a retry nor a dead letter: the producer asked for the task to be dropped
        when late, and a replay would be late again. ``meta`` is the status meta.
        """
        if _stdlog.isEnabledFor(_WARNING):
            emit(_stdlog, _WARNING, "task.expired", task=env.name, task_id=env.id,
                 state=TaskState.CANCELLED.value, attempt=env.attempt, queue=d.queue,
                 expires_at=env.meta.get(META_EXPIRES_AT))
        metrics.recorder.task_expired(env.name, env.queue)
        self.status(TaskStatus(env.id, TaskState.CANCELLED, error=TaskError(
            type="TaskExpired", message="Task expired before execution"), meta=meta,
            attempt=env.attempt), ttl)
        self._ended(env)
        self._acks.append(d)
        self.pending_receipts.add(d.receipt)
        self._schedule()

    def revoked(self, d: Delivery, env: Envelope, meta: dict[str, Any], ttl: float | None,
                message: str) -> None:
        """Settle a revoked delivery: store CANCELLED (``TaskRevoked``), then ack; never
        retried nor dead-lettered (whoever revoked it asked for it not to run)."""
        if _stdlog.isEnabledFor(_WARNING):
            emit(_stdlog, _WARNING, "task.revoked", task=env.name, task_id=env.id,
                 state=TaskState.CANCELLED.value, attempt=env.attempt, queue=d.queue,
                 reason=meta.get("revokedReason"))
        self.status(TaskStatus(env.id, TaskState.CANCELLED, error=TaskError(
            type="TaskRevoked", message=message), meta=meta, attempt=env.attempt), ttl)
        self._ended(env)
        self._acks.append(d)
        self.pending_receipts.add(d.receipt)
        self._schedule()

    def reject(self, d: Delivery, task_id: str | None, reason: str, error_type: str,
               env: Envelope | None, *, meta: dict[str, Any] | None = None,
               error_meta: dict[str, Any] | None = None) -> None:
        """Dead-letter ``d`` with ``reason`` (and record FAILED, see the class docstring)."""
        if _stdlog.isEnabledFor(_WARNING):
            emit(_stdlog, _WARNING, "task.dead_lettered", task=env.name if env else None,
                 task_id=task_id, state=TaskState.FAILED.value,
                 attempt=env.attempt if env else None, queue=d.queue, reason=reason)
        signals.task_rejected.send(self._sender, reason=reason, envelope=env, raw=d.raw)
        metrics.recorder.task_rejected(env.name if env else "", env.queue if env else d.queue)
        if task_id is not None:
            self._reject_statuses[task_id] = TaskStatus(
                task_id, TaskState.FAILED,
                error=TaskError(type=error_type, message=reason, meta=error_meta or {}),
                attempt=env.attempt if env else 0,
                meta={"deadLetterReason": reason, **(meta or {})})
        self._dead.append((d, reason))
        if env is not None:
            self._ended(env)
        self.pending_receipts.add(d.receipt)
        self._schedule()

    def _ended(self, env: Envelope) -> None:
        """The task reached its end: release its unique lock after the settle."""
        if META_UNIQUE_KEY in env.meta and env.meta.get(META_UNIQUE_OWNER) == env.id:
            key = env.meta[META_UNIQUE_KEY]
            if isinstance(key, str) and key:
                self._unlock.append((lock_key(key), env.id))

    def abandon(self, d: Delivery, env: Envelope, reason: str, error_type: str) -> None:
        """Last resort for a delivery whose outcome could not be recorded: dead-letter it.

        Undoes whatever part of the outcome was queued, so it settles exactly once.
        """
        self._acks = [a for a in self._acks if a is not d]
        self._retries = [r for r in self._retries if r[0] is not d]
        self._dead = [x for x in self._dead if x[0] is not d]
        self._statuses.pop(env.id, None)
        self.reject(d, env.id, reason, error_type, env)

    def outcome(self, d: Delivery, prepared: Prepared, ctx: TaskContext, outcome: Outcome,
                base_meta: dict[str, Any], runtime: float) -> None:
        """Queue what an attempt's outcome means (status + ack, retry or failure); log it.

        ``runtime`` is how long the handler ran, in seconds.
        """
        env = prepared.envelope
        ttl = prepared.definition.options.result_ttl
        # base_meta belongs to this attempt alone and is finished with here: no copy.
        meta = base_meta
        if ctx.meta:
            meta.update(ctx.meta)
        if ctx.progress_state is not None:
            meta["progress"] = ctx.progress_state
        if isinstance(outcome, Success):
            if prepared.ignore_result:
                # Also when only the worker's task option said so: readers then know the
                # null payload is no value (app.wait skips the task's decode for it).
                meta[META_IGNORE_RESULT] = True
            meta[RESULT_ENCODER_META] = outcome.encoder_id
            meta["completedAt"] = now_iso()
            self.status(TaskStatus(env.id, TaskState.SUCCEEDED, payload=outcome.payload,
                                   meta=meta, attempt=env.attempt), ttl)
            self._ended(env)
            self._acks.append(d)
            if _stdlog.isEnabledFor(_INFO):
                emit(_stdlog, _INFO, "task.succeeded", task=env.name, task_id=env.id,
                     state=TaskState.SUCCEEDED.value, attempt=env.attempt,
                     runtime=round(runtime, 6))
            metrics.recorder.task_succeeded(env.name, env.queue, runtime)
        elif isinstance(outcome, RetryLater):
            if _stdlog.isEnabledFor(_INFO):
                emit(_stdlog, _INFO, "task.retried", task=env.name, task_id=env.id,
                     state=TaskState.RETRIED.value, attempt=env.attempt,
                     runtime=round(runtime, 6), delay=round(outcome.delay, 3),
                     error=outcome.error.message)
            metrics.recorder.task_retried(env.name, env.queue, runtime)
            meta["retryDelayMs"] = round(outcome.delay * 1000)
            self.status(TaskStatus(env.id, TaskState.RETRIED, error=outcome.error,
                                   meta=meta, attempt=env.attempt), ttl)
            self._retries.append((d, outcome.next_envelope))
        elif isinstance(outcome, Failure):
            if _stdlog.isEnabledFor(_WARNING):
                emit(_stdlog, _WARNING, "task.failed", task=env.name, task_id=env.id,
                     state=TaskState.FAILED.value, attempt=env.attempt,
                     runtime=round(runtime, 6), error_type=outcome.error.type,
                     error=outcome.error.message)
            metrics.recorder.task_failed(env.name, env.queue, runtime)
            meta["failedAt"] = now_iso()
            if outcome.dead_letter is not None:
                meta["deadLetterReason"] = outcome.dead_letter
            self.status(TaskStatus(env.id, TaskState.FAILED, error=outcome.error,
                                   meta=meta, attempt=env.attempt), ttl)
            self._ended(env)
            if outcome.dead_letter is None:
                self._acks.append(d)
            else:
                # Out of retries (or Reject(dead_letter=True)): the status says FAILED
                # and the message waits in the dead letters for a replay once fixed.
                self._dead.append((d, outcome.dead_letter))
        self.pending_receipts.add(d.receipt)
        self._schedule()

    def reschedule(self, d: Delivery, env: Envelope, next_env: Envelope, meta: dict[str, Any],
                   ttl: float | None, delay: float) -> None:
        """Re-publish ``d`` as ``next_env`` without having run it (over a rate limit):
        the same attempt, due later, so no retry is used up. Status RETRIED with ``meta``."""
        if _stdlog.isEnabledFor(logging.DEBUG):
            emit(_stdlog, logging.DEBUG, "task.rate_limited", task=env.name, task_id=env.id,
                 state=TaskState.RETRIED.value, attempt=env.attempt, delay=round(delay, 3))
        self.status(TaskStatus(env.id, TaskState.RETRIED, meta=meta, attempt=env.attempt), ttl)
        self._retries.append((d, next_env))
        self.pending_receipts.add(d.receipt)
        self._schedule()

    async def _flush_loop(self) -> None:
        while self._statuses or self._reject_statuses or self._acks or self._retries \
                or self._dead:
            await self._flush_once()

    async def _flush_once(self) -> None:
        statuses, self._statuses = self._statuses, {}
        rejected, self._reject_statuses = self._reject_statuses, {}
        acks, self._acks = self._acks, []
        retries, self._retries = self._retries, []
        dead, self._dead = self._dead, []
        broker, backend = self._broker, self._backend
        if rejected:
            await self._add_reject_statuses(statuses, rejected)
        backoff = 0.05
        atomic = self._atomic_ack
        if statuses and acks and atomic is not None:
            # Same store: results and acks in one transaction, one round-trip.
            try:
                await atomic.ack_with_results(
                    acks, list(statuses.values()), default_ttl=backend.default_ttl)
                statuses, acks_done = {}, acks
                acks = []
            except Exception as exc:
                log.error("worker.result_write_failed", error=repr(exc), count=len(statuses))
                acks_done = []
        else:
            acks_done = []
        while statuses:
            try:
                await backend.set_many(list(statuses.values()))
                break
            except Exception as exc:
                log.error("worker.result_write_failed", error=repr(exc), count=len(statuses))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        ops: list[tuple[Any, int]] = []
        if acks:
            ops.append((broker.ack(acks), len(acks)))
        if retries:
            ops.append((self._retry(retries), len(retries)))
        if dead:
            ops.append((broker.dead_letter(dead), len(dead)))
        results = await asyncio.gather(*(op for op, _ in ops), return_exceptions=True)
        for r, (_, count) in zip(results, ops, strict=True):
            if isinstance(r, BaseException):
                # The lease will expire and the task be redelivered; the terminal status
                # already stored makes the redelivery a skipped duplicate.
                log.error("worker.settle_failed", error=repr(r), count=count)
                if self._stopping():
                    self.lost_settles += count
        receipts = [d.receipt for d in acks + acks_done] + [d.receipt for d, _ in retries] + [
            d.receipt for d, _ in dead
        ]
        self.pending_receipts.difference_update(receipts)
        self._on_settled(receipts)
        if self._unlock:
            await self._release_unique()

    async def _release_unique(self) -> None:
        """Release the unique locks of tasks that ended (owner-checked: a lock that
        expired and was taken by a newer task stays). Failures are logged; the lock
        then runs out on its own."""
        unlock, self._unlock = self._unlock, []
        if self._unique_locks is None:
            return
        try:
            locks = self._unique_locks()
            for key, owner in unlock:
                await locks.release(key, owner)
        except Exception as exc:
            log.warning("worker.unique_release_failed", error=repr(exc), count=len(unlock))

    async def _add_reject_statuses(self, statuses: dict[str, tuple[TaskStatus, float | None]],
                                   rejected: dict[str, TaskStatus]) -> None:
        """Add the FAILED statuses of rejected deliveries that overwrite no terminal one."""
        ids = [i for i in rejected if i not in statuses]  # a real attempt in this batch wins
        if not ids:
            return
        backoff = 0.05
        while True:
            try:
                stored = await self._backend.get_many(ids)
                break
            except Exception as exc:
                log.error("worker.result_read_failed", error=repr(exc), count=len(ids))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        for task_id in ids:
            current = stored.get(task_id)
            if current is not None and current.state.is_terminal:
                log.info("task.reject_kept_status", task_id=task_id, state=current.state.value)
                continue
            statuses[task_id] = (rejected[task_id], None)

    async def _retry(self, retries: list[tuple[Delivery, Envelope]]) -> None:
        """Publish retries; one that cannot be encoded (over the size cap) is dead-lettered."""
        broker = self._broker
        try:
            await broker.retry(retries)
            return
        except EnvelopeDecodeError:
            pass
        ok: list[tuple[Delivery, Envelope]] = []
        bad: list[tuple[Delivery, str]] = []
        for d, env in retries:
            try:
                env.to_json()
                ok.append((d, env))
            except EnvelopeDecodeError as exc:
                bad.append((d, f"retry could not be published: {exc}"))
        if ok:
            await broker.retry(ok)
        if bad:
            await broker.dead_letter(bad)

    async def flush_all(self) -> None:
        """Write everything queued (waiting for a flush under way first)."""
        if self._flushing is not None and not self._flushing.done():
            await self._flushing
        await self._flush_loop()
