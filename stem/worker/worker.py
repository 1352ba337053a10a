"""The worker: fetch → dispatch → execute → complete, with leases and graceful shutdown.

Pipeline: one fetcher asks the broker for up to the number of free slots; each
delivery runs as its own asyncio task; outcomes go to the completer
(:mod:`stem.worker.completer`), which flushes everything produced in one loop tick
together — statuses first (results are written before the ack), then acks, retry
re-publishes and dead letters. A lease keeper renews the leases of everything still
in flight. Handlers reach the worker through their TaskContext, whose operations
live in :mod:`stem.worker.context_ops`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stem import metrics, signals, tracing
from stem._aio import cancel_and_wait, wait_event
from stem._time import now_iso
from stem._urls import mask_url
from stem.adapters.sqlite._paths import path_from_url
from stem.context import TaskContext
from stem.control import heartbeat_interval as control_heartbeat_interval
from stem.envelope import Envelope, payload_limit, peek_task_id
from stem.errors import ConfigurationError, ServiceUnavailableError, UnsettledDeliveriesError
from stem.limits import check_visibility_timeout, visibility_timeout_problem
from stem.log import get_logger
from stem.ports import AtomicAckStore, Delivery
from stem.retry import RetryStrategy
from stem.revoke import RevokeEntry
from stem.status import TaskError, TaskState, TaskStatus
from stem.worker import canvas_hooks
from stem.worker.completer import Completer
from stem.worker.context_ops import ContextRuntime, WorkerContextOps
from stem.worker.control import WorkerControl
from stem.worker.executor import Executor
from stem.worker.pool import PoolConfig
from stem.worker.processor import (
    Expired,
    Failure,
    Outcome,
    Prepared,
    Processor,
    Rejected,
    RetryLater,
    Success,
)
from stem.worker.ratelimit import RateGate, limits_of
from stem.worker.revoke import Revocations, RunningTasks, revoked_message, revoked_meta

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from stem.app import Stem
    from stem.task import TaskDefinition

log = get_logger(__name__)

#: The lease keeper looks at in-flight leases at least this often (seconds).
_KEEPER_MAX_SLEEP = 1.0
#: At shutdown, results and acks still being written get at least this long (seconds)
#: even when running tasks used up the whole grace.
_FINAL_FLUSH_MIN = 2.0


def shown_url(url: str) -> str:
    """``url`` as logs show it: secrets masked, a SQLite file as an absolute path."""
    if url.split(":", 1)[0].lower() == "sqlite":
        try:
            return "sqlite:///" + path_from_url(url)
        except Exception:
            pass  # not a usable SQLite URL: show it masked as it is
    return mask_url(url)


@dataclass(slots=True)
class _InFlight:
    delivery: Delivery
    visibility_timeout: float
    deadline: float  # monotonic time our lease runs out, as far as we know


class Worker:
    """Consumes queues and runs tasks of ``app``.

    ``concurrency`` bounds tasks in flight (and the thread pool). ``queues``
    defaults to every queue the app's tasks route to. ``shutdown_grace`` bounds how
    long a graceful stop waits for running tasks before requeueing them.

    ``prefetch_multiplier`` (default 4, as in Celery): up to ``concurrency x
    prefetch_multiplier`` tasks are leased at once; those beyond the running ones
    wait in a local buffer (their leases renewed) and start the moment a slot frees,
    without a broker round-trip, while the fetcher asks for large batches. Use 1 when
    many workers share a queue of long tasks and an idle worker should get them first.

    ``pool_size=N`` runs ``def`` handlers without explicit isolation in N child processes
    (``--pool N``); without it, tasks that need the process pool (``isolation=
    "process"``, or a ``def`` handler with a hard time limit) get one sized
    ``min(cpu_count, concurrency)``. Children import the app as ``app_spec``
    (``module:attribute``; found by itself when None and the app lives in an
    importable module). ``max_tasks_per_child`` and ``max_memory_per_child`` (KiB)
    recycle children. See :mod:`stem.worker.executor` and :mod:`stem.worker.pool`.

    ``connect_timeout`` (seconds, default 0: fail at once): how long :meth:`run` waits
    for an unreachable broker or backend at startup, retrying with backoff.

    Every delivery ends in exactly one of ack, retry or dead letter, whatever a
    handler, an envelope field or a retry strategy raises (an error in the worker's
    own settling code dead-letters the delivery with the reason). Shutdown is bounded
    by ``shutdown_grace``: what cannot be settled by then (the store is down) is left
    to its lease, and :meth:`run` raises :class:`~stem.errors.UnsettledDeliveriesError`
    saying how many.
    """

    def __init__(
        self,
        app: Stem,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        retry_strategy: RetryStrategy | None = None,
        block_time: float = 1.0,
        shutdown_grace: float = 30.0,
        consumer_name: str | None = None,
        pool_size: int | None = None,
        app_spec: str | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        prefetch_multiplier: int = 4,
        heartbeat_interval: float | None = None,
        connect_timeout: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if prefetch_multiplier < 1:
            raise ValueError("prefetch_multiplier must be >= 1")
        if heartbeat_interval is None:  # STEM_HEARTBEAT_INTERVAL, else 10 s
            heartbeat_interval = control_heartbeat_interval()
        if not heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be > 0 seconds")
        self.prefetch_multiplier = prefetch_multiplier
        self.connect_timeout = connect_timeout
        self.app = app
        self.app_spec = app_spec
        self.pool_size = pool_size
        self.queues = list(queues) if queues else self._default_queues(app)
        self.concurrency = concurrency
        self.block_time = block_time
        self.shutdown_grace = shutdown_grace
        self.consumer_name = consumer_name or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.processor = Processor(app, retry_strategy)
        self.executor = Executor(
            threads=concurrency, app=app, pool_default=pool_size is not None, sender=self,
            pool=PoolConfig(size=pool_size or min(os.cpu_count() or 1, concurrency),
                            app_spec=app_spec, max_tasks_per_child=max_tasks_per_child,
                            max_memory_per_child=max_memory_per_child),
        )
        self._active: dict[str, _InFlight] = {}  # receipt -> in flight (running or settling)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._running = 0
        self._waiting: deque[tuple[Delivery, Prepared]] = deque()
        self._stop = asyncio.Event()
        self._lease_changed = asyncio.Event()
        self._completer: Completer | None = None
        self._context_runtime: ContextRuntime | None = None
        #: Admits rate-limited tasks (stem.worker.ratelimit); limiter from the app.
        self.rate_gate = RateGate(lambda: self.app.rate_limiter)
        self.processed = 0
        self._fetch_failing = False
        #: The revoke store's entries as this worker knows them (stem.worker.revoke).
        self.revocations = Revocations(lambda: self.app.revokes,
                                       on_change=self._revocations_changed)
        #: The attempts running now (terminate, stats, inspect).
        self.running = RunningTasks()
        #: The loop run() runs on (set there).
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        #: Attempts that failed for good (stats).
        self.failed = 0
        #: Answers control commands and writes heartbeats (stem.worker.control).
        self.control = WorkerControl(self)
        self._stop_deadline: float | None = None  # monotonic; set when the drain starts
        #: Seconds between two ``worker_heartbeat`` signals.
        self.heartbeat_interval = heartbeat_interval
        signals.worker_init.send(self)

    @staticmethod
    def _default_queues(app: Stem) -> list[str]:
        queues = [app.default_queue]
        for d in app.tasks.values():
            if d.options.queue not in queues:
                queues.append(d.options.queue)
        return queues

    def describe(self) -> dict[str, Any]:
        """What the startup banner (the ``worker.started`` event) shows.

        The app (its ``module:attribute`` spec when known), its namespace, broker and
        backend URLs with passwords masked and SQLite paths made absolute, queues,
        concurrency, prefetch
        (tasks leased at once), where ``def`` handlers without explicit isolation run
        (``pool``: thread or process) and the process pool's children (0 when none runs).
        """
        process_pool = self.executor.process_pool
        return {
            "app": self.app_spec or self.app.name,
            "namespace": self.app.namespace,
            "consumer": self.consumer_name,
            "broker": shown_url(self.app.broker_url),
            "backend": shown_url(self.app.backend_url),
            "queues": list(self.queues),
            "concurrency": self.concurrency,
            "prefetch": self.concurrency * self.prefetch_multiplier,
            "pool": "process" if self.pool_size is not None else "thread",
            "processes": process_pool.config.size if process_pool is not None else 0,
            "tasks": len(self.app.tasks),
        }

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    def shutdown(self, mode: str = "soft") -> None:
        """Stop: ``warm`` finishes in-flight work however long it takes, ``soft`` waits
        ``shutdown_grace`` then requeues what still runs, ``hard`` requeues in-flight
        work now (another worker runs it)."""
        if self._stop_deadline is None:
            if mode == "warm":
                self.shutdown_grace = 365 * 86_400.0
            elif mode == "hard":
                self.shutdown_grace = 0.0
        log.info("worker.shutdown_requested", mode=mode, consumer=self.consumer_name)
        self.request_stop()

    def request_stop(self) -> None:
        """Stop fetching and drain (safe to call from a signal handler on the loop)."""
        self._stop.set()
        self._slot_free.set()

    async def _wait_for_stores(self) -> None:
        """Ping the broker, then the backend; while one is unreachable, retry with backoff
        (0.1 s doubling to 5 s) for up to ``connect_timeout`` seconds, logging
        ``worker.waiting_for_store`` each time, then raise the last error.

        A compose stack or a reboot may start the worker before its Redis or Postgres
        accepts connections; a bad URL or refused credentials still fail at once
        (a :class:`~stem.errors.ConfigurationError` is never retried).
        """
        deadline = time.monotonic() + self.connect_timeout
        for what, url, part in (("broker", self.app.broker_url, self.app.broker),
                                ("backend", self.app.backend_url, self.app.backend)):
            delay, tries = 0.1, 0
            while True:
                try:
                    await part.ping()
                    break
                except ConfigurationError:
                    raise
                except (ServiceUnavailableError, OSError) as exc:
                    tries += 1
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop.is_set():
                        raise
                    wait = min(delay, left)
                    log.warning("worker.waiting_for_store", store=what, url=shown_url(url),
                                attempt=tries, retry_in=round(wait, 2),
                                gives_up_in=round(left, 1), error=str(exc) or type(exc).__name__)
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, 5.0)
            if tries:
                log.info("worker.store_reachable", store=what, url=shown_url(url), attempts=tries + 1)

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then drain in-flight work and return.

        Raises :class:`~stem.errors.UnsettledDeliveriesError` when deliveries were left
        unsettled because the grace ran out while the store was unreachable.
        """
        self._loop = asyncio.get_running_loop()
        broker, backend = self.app.broker, self.app.backend
        payload_limit()  # a bad STEM_MAX_PAYLOAD_BYTES fails here, not in every fetch
        check_visibility_timeout(broker.default_visibility_timeout)
        await self._wait_for_stores()
        await self.executor.start()  # warm the process pool before taking work
        if any(limits_of(d.options, {}) for d in self.app.tasks.values()):
            _ = self.app.rate_limiter  # no limiter for rate-limited tasks: fail at start
        shared = self.app.shared_store
        # Broker and backend from one store that can ack with results atomically.
        self._completer = completer = Completer(
            broker, backend, on_settled=self._settled, stopping=self._stop.is_set,
            atomic_ack=shared if isinstance(shared, AtomicAckStore) else None, sender=self,
            result_ttl=self.app.result_ttl, unique_locks=lambda: self.app.locks)
        self._context_runtime = ContextRuntime(
            app=self.app, loop=asyncio.get_running_loop(), record_status=completer.status,
            lease_length=self._lease_length, extend_lease=self.extend_lease,
            spawn=self._spawn, sender=self, revoked=self.running.revoked)
        await self.revocations.load()  # a revoke issued before this worker started holds
        await self.control.start()
        log.info("worker.started", **self.describe())
        keeper = asyncio.create_task(self._lease_keeper())
        syncer = asyncio.create_task(self.revocations.run())
        metrics.recorder.worker_started(self)
        observer = asyncio.create_task(self._observe())
        signals.worker_ready.send(self)
        try:
            await self._fetch_loop()
            signals.worker_stopping.send(self, in_flight=self._running,
                                         prefetched=len(self._waiting))
            await self._drain()
        finally:
            await asyncio.gather(cancel_and_wait(keeper, syncer, observer), self.control.stop(),
                                 return_exceptions=True)
            left = await self._final_flush()
            await self.executor.close()
            metrics.recorder.worker_stopped(self)
            signals.worker_shutdown.send(self)
            log.info("worker.stopped", consumer=self.consumer_name, processed=self.processed,
                     unsettled=left)
        if left:
            raise UnsettledDeliveriesError(left)

    @property
    def in_flight(self) -> int:
        """Tasks running now (their handlers started, not finished)."""
        return self._running

    @property
    def prefetched(self) -> int:
        """Tasks leased and waiting in the local buffer for a free slot."""
        return len(self._waiting)

    async def _observe(self) -> None:
        """Send ``worker_heartbeat`` every ``heartbeat_interval`` seconds and, with
        metrics on, sample the served queues' depth every few seconds."""
        hb_every = self.heartbeat_interval
        sample_every = metrics.QUEUE_SAMPLE_INTERVAL
        next_hb = time.monotonic() + hb_every
        while True:
            if metrics.recorder.enabled:
                for q in self.queues:
                    try:
                        metrics.recorder.queue_sampled(await self.app.broker.stats(q))
                    except Exception as exc:  # an outage: the fetch loop reports it
                        log.debug("worker.queue_sample_failed", queue=q, error=repr(exc))
                        break
            now = time.monotonic()
            if now >= next_hb:
                next_hb = now + hb_every
                signals.worker_heartbeat.send(
                    self, in_flight=self._running, prefetched=len(self._waiting),
                    processed=self.processed, queues=list(self.queues))
            wait = next_hb - now
            if metrics.recorder.enabled:
                wait = min(wait, sample_every)
            await asyncio.sleep(max(wait, 0.01))

    def _remaining_grace(self) -> float:
        """Seconds left of the shutdown grace (which starts at the first call)."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.shutdown_grace
        return max(0.0, self._stop_deadline - time.monotonic())

    async def _final_flush(self) -> int:
        """Write what is still pending, for at most the rest of the grace; return what is left.

        Deliveries still unsettled after that (the store is down) keep their leases,
        which the stopped lease keeper no longer renews, so they come back.
        """
        assert self._completer is not None
        timeout = max(self._remaining_grace(), _FINAL_FLUSH_MIN)
        try:
            await asyncio.wait_for(self._completer.flush_all(), timeout)
        except TimeoutError:
            log.error("worker.flush_abandoned", grace=self.shutdown_grace,
                      unsettled=len(self._active))
        except Exception as exc:
            log.error("worker.flush_failed", error=repr(exc), unsettled=len(self._active))
        left = len(self._active) + self._completer.lost_settles
        if left:
            log.error("worker.unsettled", count=left)
        return left

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        """Nack ``deliveries`` within the grace; if that fails they wait for their leases."""
        try:
            await asyncio.wait_for(self.app.broker.nack(deliveries),
                                   max(self._remaining_grace(), _FINAL_FLUSH_MIN))
        except Exception as exc:
            log.error("worker.requeue_failed", error=repr(exc), count=len(deliveries))
            return
        self._settled([d.receipt for d in deliveries])

    async def _drain(self) -> None:
        self._remaining_grace()  # the grace starts now
        if self._waiting:
            # Prefetched but never started: hand them back at once.
            waiting = [d for d, _ in self._waiting]
            self._waiting.clear()
            await self._hand_back(waiting)
        running = [t for t in self._tasks if not t.done()]
        if running:
            log.info("worker.draining", in_flight=len(running), grace=self.shutdown_grace)
            _, pending = await asyncio.wait(running, timeout=self._remaining_grace())
            if pending:
                # Past the grace period: give the work back so another worker runs it now
                # instead of after the visibility timeout.
                requeue = [
                    f.delivery for f in self._active.values()
                    if f.delivery.receipt in self._running_receipts
                ]
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if requeue:
                    await self._hand_back(requeue)
                    log.warning("worker.requeued", count=len(requeue))

    # -- fetch + dispatch ---------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        broker = self.app.broker
        backoff = 0.1
        while not self._stop.is_set():
            # Running plus prefetched work is bounded by the prefetch limit; settling work
            # (results being written) only by twice that, so fetches overlap the flush.
            limit = self.concurrency * self.prefetch_multiplier
            free = min(limit - self._running - len(self._waiting),
                       2 * limit - len(self._active))
            if free <= 0 or (self._waiting and free < max(1, limit // 4)):
                # Work is queued locally: wait until a real batch is worth fetching.
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            queues = self._consumed_queues()
            if not queues:  # every queue is paused: wait for a resume (or the stop)
                self._slot_free.clear()
                await wait_event(self._slot_free, self.block_time)
                continue
            try:
                deliveries = await broker.fetch(
                    queues, free, block=self.block_time, consumer=self.consumer_name
                )
                if deliveries and not self._stop.is_set():
                    await self._dispatch(deliveries)
                    # Let the tasks just started take their first step before the next
                    # fetch is packed and sent: that is the idle worker's latency.
                    await asyncio.sleep(0)
            except Exception as exc:  # an outage: log once, back off, keep going
                if not self._fetch_failing:
                    log.error("worker.fetch_failed", error=repr(exc))
                    self._fetch_failing = True
                await wait_event(self._stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if self._fetch_failing:
                log.info("worker.fetch_recovered")
                self._fetch_failing = False
            backoff = 0.1
            if deliveries and self._stop.is_set():
                await broker.nack(deliveries)
                break

    def _consumed_queues(self) -> list[str]:
        """The queues to fetch from: those not paused."""
        paused = self.revocations.paused
        return [q for q in self.queues if q not in paused] if paused else self.queues

    async def _dispatch(self, deliveries: list[Delivery]) -> None:
        assert self._completer is not None
        paused = self.revocations.paused
        if paused and any(d.queue in paused for d in deliveries):
            # Fetched while its queue was being paused: give it back untouched.
            await self.app.broker.nack([d for d in deliveries if d.queue in paused])
            deliveries = [d for d in deliveries if d.queue not in paused]
        now = time.monotonic()
        default_vt = self.app.broker.default_visibility_timeout
        good: list[tuple[Delivery, Envelope]] = []
        for d in deliveries:
            env = d.envelope
            if env is None:
                reason = f"undecodable envelope: {d.decode_error}"
                self._track(d, default_vt, now)
                self._completer.reject(d, peek_task_id(d.raw), reason, "EnvelopeDecodeError", None)
                continue
            good.append((d, env))
        if not good:
            return
        # A redelivery of a task that already finished (e.g. acked too late) must not run twice.
        check = [env.id for d, env in good if d.redelivered]
        try:
            done = await self.app.backend.get_many(check) if check else {}
        except Exception:
            # Can't tell duplicates apart while the backend is down: hand the work back.
            await self.app.broker.nack([d for d, _ in good])
            raise
        for d, env in good:
            # Decoding guarantees a timeout within the lease bounds or None (the default):
            # exactly what the broker leased this delivery for.
            vt = default_vt if env.visibility_timeout is None else env.visibility_timeout
            self._track(d, vt, now)
            status = done.get(env.id)
            if status is not None and status.state.is_terminal:
                log.debug("task.duplicate_skipped", task_id=env.id, state=status.state.value)
                self._completer.ack_only(d)
                continue
            if signals.task_received.has_receivers:
                signals.task_received.send(self, envelope=env)
            try:
                prepared = self.processor.prepare(env)
            except Exception as exc:  # a bug in preparing must still settle the delivery
                log.exception("worker.prepare_failed", task_id=env.id, task=env.name)
                self._completer.reject(d, env.id, f"worker error preparing the task: {exc!r}",
                                       type(exc).__name__, env)
                continue
            if isinstance(prepared, Rejected):
                if canvas_hooks.wants(env):
                    await self._unrun_follow_ups(d, env, TaskError(
                        type=prepared.error_type, message=prepared.reason), expired=False)
                self._completer.reject(d, env.id, prepared.reason, prepared.error_type, env,
                                       meta=prepared.meta, error_meta=prepared.error_meta)
                continue
            if isinstance(prepared, Expired):
                await self._expire(d, prepared.envelope, prepared.definition)
                continue
            if self._running < self.concurrency:
                self._start(d, prepared)
            else:
                self._waiting.append((d, prepared))

    def _start(self, d: Delivery, prepared: Prepared) -> None:
        self._running += 1
        # The loop's own method: asyncio.create_task asks for the running loop, which on
        # Python 3.11 is a getpid() system call, once per task.
        task = self._loop.create_task(self._slot(d, prepared))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _slot(self, d: Delivery, prepared: Prepared) -> None:
        """Run ``d``, then, while work waits in the prefetch buffer, the next one in the
        same asyncio task: a task per delivery (creation, first step, done callback)
        was a tenth of a drained no-op task's cost. ``_run`` says when it may chain:
        its handler has returned and nothing after it awaits."""
        while await self._run(d, prepared):
            if not self._waiting or self._stop.is_set() or self._running >= self.concurrency:
                return
            d, prepared = self._waiting.popleft()
            self._running += 1

    def _track(self, d: Delivery, vt: float, now: float) -> None:
        self._active[d.receipt] = _InFlight(d, vt, now + vt)
        if vt / 2 < _KEEPER_MAX_SLEEP:
            # Only a lease shorter than the keeper's own wake-up period needs it now;
            # waking it for every task would cost an idle worker's latency.
            self._lease_changed.set()

    def _settled(self, receipts: Sequence[str]) -> None:
        for r in receipts:
            self._active.pop(r, None)
        self._slot_free.set()

    @property
    def _running_receipts(self) -> set[str]:
        return {r for r, f in self._active.items() if r not in self._settling}

    @property
    def _settling(self) -> set[str]:
        assert self._completer is not None
        return self._completer.pending_receipts

    # -- execution ----------------------------------------------------------------------

    def _free_slot(self, chain: bool = False) -> None:
        """A handler ended: its slot takes the next waiting delivery — in a task of its
        own, or (``chain``) in this one once it is done (see :meth:`_slot`)."""
        self._running -= 1
        if self._waiting and not chain and not self._stop.is_set():
            self._start(*self._waiting.popleft())
        self._slot_free.set()

    async def _run(self, d: Delivery, prepared: Prepared) -> bool:
        """Run one delivery to its outcome; True when the caller may run the next waiting
        delivery in this task (the slot was freed for it, see :meth:`_slot`)."""
        completer, runtime = self._completer, self._context_runtime
        assert completer is not None and runtime is not None
        env = prepared.envelope
        holding_slot = True
        # Whether the slot was freed for this task to run the next waiting delivery:
        # only when nothing awaits after the handler (canvas follow-ups do).
        chain = False
        spans = tracing.TaskSpans(env, self.app.namespace) if (
            tracing.ENABLED and tracing.active()) else None
        outcome: Outcome | None = None
        try:
            if prepared.expired:
                # Its deadline passed while it waited in the prefetch buffer.
                await self._expire(d, env, prepared.definition)
                return False
            revoked = self.revocations.get(env.id)
            if revoked is not None:
                await self._revoke(d, env, prepared.definition, revoked)
                return False
            options = prepared.definition.options
            if limits_of(options, env.meta) and await self._rate_limited(d, prepared):
                return False
            env = prepared.envelope  # without the rate-limit slot it may have used
            # The keys the Dart worker writes into status meta, so tooling of either reads both.
            base_meta = {**env.meta, "task": env.name, "queue": env.queue,
                         "stem.task": env.name, "stem.queue": env.queue,
                         "worker": self.consumer_name, "startedAt": now_iso()}
            ctx = TaskContext(env, WorkerContextOps(runtime, d, base_meta))
            if signals.task_prerun.has_receivers:
                signals.task_prerun.send(self, envelope=env, context=ctx)
            if options.track_started:
                completer.status(
                    TaskStatus(env.id, TaskState.RUNNING, attempt=env.attempt,
                               meta=dict(base_meta)),
                    options.result_ttl,
                )
            metrics.recorder.task_started(env.name, env.queue)
            started = time.perf_counter()
            run = self.running.start(env, prepared.definition.is_async, self._loop)
            try:
                if spans is None:
                    value = await self.executor.execute(prepared, ctx)
                else:
                    with spans.execute():
                        value = await self.executor.execute(prepared, ctx)
            except BaseException as exc:
                revoked = self.running.revoked_by(run, exc)
                if revoked is None and isinstance(exc, asyncio.CancelledError):
                    raise
                elapsed = time.perf_counter() - started
                holding_slot = False
                chain = revoked is None and not canvas_hooks.wants(env)
                self._free_slot(chain)
                if revoked is not None:  # stopped by a terminate revoke
                    self.processed += 1
                    await self._revoke(d, env, prepared.definition, revoked, base_meta)
                    return False
                outcome = self.processor.failure(prepared, exc)
            else:
                elapsed = time.perf_counter() - started
                holding_slot = False
                chain = not canvas_hooks.wants(env)
                self._free_slot(chain)
                outcome = self.processor.success(prepared, value)
            finally:
                self.running.end(run)
            self.processed += 1
            if isinstance(outcome, Failure):
                self.failed += 1
            if canvas_hooks.wants(env):  # links, chains, groups: before the status and ack
                await canvas_hooks.run(self.app, env, outcome, redelivered=d.redelivered)
            completer.outcome(d, prepared, ctx, outcome, base_meta, elapsed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in classifying or recording the outcome (a retry strategy that raises,
            # say): the delivery must still settle, or its lease is renewed forever and
            # its slot never comes back. Dead-letter it, so it can be replayed once fixed.
            log.exception("worker.settle_error", task_id=env.id, task=env.name)
            completer.abandon(d, env, f"worker error settling the task: {exc!r}",
                              type(exc).__name__)
            return chain
        finally:
            if holding_slot:
                self._free_slot()
            if spans is not None:
                spans.end(None if outcome is None else _STATES.get(type(outcome)))
        if outcome is not None:
            _emit_outcome(self, env, outcome)
        return chain

    async def _rate_limited(self, d: Delivery, prepared: Prepared) -> bool:
        """Ask the rate gate; True when the delivery was re-scheduled instead of run."""
        assert self._completer is not None
        deferral = await self.rate_gate.admit(prepared)
        if deferral is None:
            return False
        env = prepared.envelope
        metrics.recorder.task_rate_limited(env.name, env.queue)
        if self.app.signer is not None:  # the old signature covers the old notBefore/meta
            self.app.signer.sign_or_strip(deferral.envelope)
        meta = {**deferral.meta, "task": env.name, "queue": env.queue,
                "worker": self.consumer_name}
        self._completer.reschedule(d, env, deferral.envelope, meta,
                                   prepared.definition.options.result_ttl, deferral.delay)
        return True

    async def _revoke(self, d: Delivery, env: Envelope, definition: TaskDefinition[Any, Any],
                      entry: RevokeEntry, base_meta: dict[str, Any] | None = None) -> None:
        """Settle a revoked delivery: stored CANCELLED with the revoke meta, acked; its
        chain stops and its group fails, as for any task that ends without a result."""
        assert self._completer is not None
        if canvas_hooks.wants(env):
            await self._unrun_follow_ups(d, env, TaskError(
                type="TaskRevoked", message=revoked_message(entry)), expired=False)
        meta = {**(base_meta or {**env.meta, "task": env.name, "queue": env.queue}),
                "worker": self.consumer_name, **revoked_meta(entry, now_iso())}
        self._completer.revoked(d, env, meta, definition.options.result_ttl,
                                revoked_message(entry))
        metrics.recorder.task_revoked(env.name, env.queue)
        signals.task_revoked.send(self, envelope=env, entry=entry, reason=entry.reason,
                                  terminated=base_meta is not None)

    def _revocations_changed(self, entries: list[RevokeEntry]) -> None:
        """New revoke entries: stop the running attempts they terminate."""
        for entry in entries:
            if entry.is_queue_pause:
                queue = entry.task_id.split(":", 1)[1]
                if entry.is_expired():
                    log.info("worker.queue_resumed", queue=queue)
                else:
                    log.info("worker.queue_paused", queue=queue)
                self._slot_free.set()  # the fetch loop looks at its queues again
            elif entry.terminate:
                self.running.terminate(entry, self.executor.process_pool)

    async def _unrun_follow_ups(self, d: Delivery, env: Envelope, error: TaskError, *,
                                expired: bool) -> None:
        """Canvas follow-ups of a task that ends without running (before it settles, so
        a crash in between brings it back); an error here is logged, never blocks the
        settle."""
        try:
            await canvas_hooks.ended_unrun(self.app, env, error, expired=expired,
                                           redelivered=d.redelivered)
        except Exception:
            log.exception("canvas.follow_up_abandoned", task=env.name, task_id=env.id)

    async def _expire(self, d: Delivery, env: Envelope,
                      definition: TaskDefinition[Any, Any]) -> None:
        """Cancel a delivery whose ``stem.expiresAt`` has passed, without running it."""
        assert self._completer is not None
        if canvas_hooks.wants(env):
            await self._unrun_follow_ups(d, env, TaskError(
                type="TaskExpired", message="Task expired before execution"), expired=True)
        # The status meta the Dart worker writes for an expired task, so either reads it.
        meta = {**env.meta, "task": env.name, "queue": env.queue,
                "worker": self.consumer_name, "expiredAt": now_iso(), "stem.expired": True}
        self._completer.expired(d, env, meta, definition.options.result_ttl)

    # -- leases -------------------------------------------------------------------------

    async def _lease_keeper(self) -> None:
        """Renew each in-flight lease when half of it has run out, in one call per lease length.

        Woken by ``_lease_changed`` when work is tracked, so a short lease fetched while
        idle is still renewed in time.
        """
        broker = self.app.broker
        while True:
            now = time.monotonic()
            next_due = min(
                (f.deadline - f.visibility_timeout / 2 for f in self._active.values()),
                default=now + _KEEPER_MAX_SLEEP,
            )
            next_due = min(next_due, now + _KEEPER_MAX_SLEEP)
            if next_due > now:
                self._lease_changed.clear()
                if await wait_event(self._lease_changed, next_due - now):
                    continue
            now = time.monotonic()
            due: dict[float, list[_InFlight]] = {}
            for f in list(self._active.values()):
                if f.deadline - f.visibility_timeout / 2 <= now + 0.005:
                    due.setdefault(f.visibility_timeout, []).append(f)
            for vt, items in due.items():
                try:
                    await broker.extend_lease([f.delivery for f in items], vt)
                except Exception as exc:
                    log.warning("worker.lease_renew_failed", error=repr(exc), count=len(items))
                    await asyncio.sleep(min(1.0, vt / 4))
                    continue
                metrics.recorder.leases_renewed(len(items))
                deadline = time.monotonic() + vt
                for f in items:
                    f.deadline = deadline

    def _lease_length(self, d: Delivery) -> float:
        """The length of ``d``'s current lease (the broker's default once it settled)."""
        f = self._active.get(d.receipt)
        return f.visibility_timeout if f else self.app.broker.default_visibility_timeout

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop as work the drain waits for (a lease extension)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def extend_lease(self, d: Delivery, seconds: float) -> None:
        """Extend one delivery's lease now (TaskContext.extend_lease / heartbeat).

        A length outside the lease bounds of :mod:`stem.limits` is ignored (logged).
        """
        problem = visibility_timeout_problem(seconds)
        if problem is not None:
            log.warning("worker.extend_lease_refused", problem=problem)
            return
        await self.app.broker.extend_lease([d], seconds)
        metrics.recorder.leases_renewed(1)
        f = self._active.get(d.receipt)
        if f is not None:
            f.deadline = max(f.deadline, time.monotonic() + seconds)


_STATES: dict[type, str] = {Success: "succeeded", RetryLater: "retried", Failure: "failed"}


def _emit_outcome(worker: Worker, env: Envelope, outcome: Outcome) -> None:
    if isinstance(outcome, Success):
        if signals.task_success.has_receivers:
            signals.task_success.send(worker, envelope=env, result=outcome.payload)
        state = TaskState.SUCCEEDED
    elif isinstance(outcome, RetryLater):
        signals.task_retry.send(worker, envelope=env, error=outcome.error, delay=outcome.delay)
        state = TaskState.RETRIED
    elif isinstance(outcome, Failure):
        signals.task_failure.send(worker, envelope=env, error=outcome.error)
        state = TaskState.FAILED
    else:
        return
    if signals.task_postrun.has_receivers:
        signals.task_postrun.send(worker, envelope=env, state=state)
