"""The process pool: long-lived child processes that can be killed at a hard time limit.

Each child is a fresh interpreter (``subprocess`` fork+exec, like multiprocessing's
``spawn`` — never a bare ``fork`` of the worker, whose event loop and threads would
be copied half-alive). It imports the app once from its spec (``module:attribute``,
what ``--app`` names) and then runs tasks one at a time, in the order it gets them,
until it is told to stop. The worker and its children talk over one socketpair per
child with length-prefixed orjson frames (:mod:`stem.worker._ipc`): envelopes go
with their already-encoded args, results come back encoded by the task's payload
encoder, exceptions as TaskError objects. Nothing is pickled.

Throughput: the parent keeps a small queue *in* each child (up to ``max_batch``
tasks, fewer when there is little work) and writes everything dispatched in one
loop tick to a child in one write; the child streams results back from a writer
thread, which batches whatever is ready. So thousands of short tasks do not pay a
round-trip each. A long task must not hold short ones back, though: once a child's
current task has run for :data:`LONG_TASK`, nothing more is queued behind it and
what already is gets revoked — the child's reader thread hands back the tasks it
has not started, and they go to another child.

Limits: a child runs tasks in order, so the parent knows which one is running (the
oldest unanswered) and when it started (when it was sent to an idle child, or when
the previous result arrived). The soft limit is armed by the child itself at the
start of each task (``setitimer`` → SIGALRM → SoftTimeLimitExceeded raised in its
main thread; for ``async def`` handlers, the inline cancellation mechanism of
:mod:`stem.worker.timelimits`) and reported back once so the worker sends the
``task_timeout`` signal. Doing it in the child means the signal can never hit the
*next* task. At the hard limit the parent fails the attempt with TimeLimitExceeded
at once, sends the child a ``terminate`` frame (which raises SystemExit in it, so
``finally`` blocks run), SIGKILLs it after ``kill_grace`` seconds, starts a
replacement, and re-dispatches the tasks that were queued behind the killed one
(they never started).

Signals: children share the worker's process group, so a SIGTERM or SIGINT sent to
the group (systemd's default ``KillMode=control-group``, ``kill -TERM -PGID``, a
container runtime, Ctrl-C) reaches them too. They drop it — the worker alone decides
when a child stops — so the group signal drains exactly like one sent to the worker:
running tasks finish, then the worker stops its children. Children are spawned with
those signals blocked (the mask survives ``exec``) and unblock them once their
handlers are in place. A child whose worker dies (even by SIGKILL) sees its socket
close and exits at once.

Crashes: a child that exits unexpectedly (``os._exit``, SIGSEGV, OOM kill) fails
the task it was running with WorkerLostError ("child pid N exited with ..."); the
tasks queued behind it are re-dispatched and a replacement is started. A child that
cannot import the app fails the tasks waiting for it with that error and is
retried with backoff.

Recycling: after ``max_tasks_per_child`` tasks, or when its resident memory after a
task exceeds ``max_memory_per_child`` KiB (read from ``/proc/self/statm``), a child
gets no more work, a replacement starts at once, and the old child exits when its
queue is empty — no task is dropped.

Exceptions from a child arrive as :class:`~stem.worker.processor.RemoteError`
(type name, message and stack preserved) or a :class:`~stem.retry.Retry` wrapping
one; a custom RetryStrategy sees the RemoteError, not the original class.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stem._aio import wait_event
from stem._time import from_iso
from stem.context import TaskContext
from stem.envelope import Envelope
from stem.errors import ConfigurationError, TimeLimitExceeded, WorkerLostError
from stem.log import get_logger
from stem.retry import Retry, RetryPolicy
from stem.status import TaskError
from stem.worker._ipc import GROUP_SIGNALS, FrameReader, call_from_wire, frame
from stem.worker.processor import EncodedResult, Prepared, RemoteError
from stem.worker.timelimits import TimeoutCallback, hard_limit_message

if TYPE_CHECKING:
    from stem.app import Stem

log = get_logger(__name__)

#: A child whose current task has run this long is probably busy with a long one:
#: queue nothing more behind it, and take back what is queued there, so short tasks
#: go to a child that will run them now.
LONG_TASK = 0.05


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Process pool settings.

    ``size`` children; ``app_spec`` (``module:attribute``) is how children import the
    app (None: found by looking the app object up in the imported modules).
    ``max_tasks_per_child`` / ``max_memory_per_child`` (KiB of resident memory, as
    Celery counts it) recycle children. ``kill_grace`` is the terminate→SIGKILL delay
    at a hard limit; ``max_batch`` bounds the tasks queued inside one child.
    """

    size: int
    app_spec: str | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    kill_grace: float = 1.0
    max_batch: int = 32
    start_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigurationError(f"pool size must be >= 1, got {self.size}")
        if self.max_tasks_per_child is not None and self.max_tasks_per_child < 1:
            raise ConfigurationError("max_tasks_per_child must be >= 1")
        if self.max_memory_per_child is not None and self.max_memory_per_child < 1:
            raise ConfigurationError("max_memory_per_child must be >= 1 (KiB)")


def infer_app_spec(app: Stem) -> str:
    """``module:attribute`` under which ``app`` can be imported in a fresh interpreter."""
    preferred = {d.func.__module__ for d in app.tasks.values() if d.func is not None}
    modules = sorted(sys.modules.items(), key=lambda kv: kv[0] not in preferred)
    for name, module in modules:
        if name in ("__main__", "__mp_main__") or module is None:
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in items:
            if value is app:
                return f"{name}:{attr}"
    raise ConfigurationError(
        f"the process pool can't tell how to import app {app.name!r} in its children; "
        "pass its spec (Worker(app_spec='module:attribute'), or run it with "
        "`stem worker start --app module:attribute`) — an app defined in __main__ "
        "can't be imported by name"
    )


def describe_exit(returncode: int | None) -> str:
    """'code 1' or 'signal SIGSEGV' for a child's exit status."""
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


class _SpawnMask(threading.local):
    depth = 0
    saved: frozenset[int | signal.Signals] = frozenset()


_spawn_mask = _SpawnMask()


@contextmanager
def _group_signals_blocked() -> Iterator[None]:
    """Block GROUP_SIGNALS in this thread while a child is spawned from it.

    The mask is inherited through fork and exec, so the child starts with them blocked:
    they stay pending, instead of killing it, until it has its handlers. Ours are
    delivered when the mask is restored. Spawns overlap (they await), so the first one
    in blocks and the last one out restores.
    """
    state = _spawn_mask
    if state.depth == 0:
        state.saved = frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS))
    state.depth += 1
    try:
        yield
    finally:
        state.depth -= 1
        if state.depth == 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, state.saved)


class _State(Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"  # no new work; stops when its queue is empty
    STOPPING = "stopping"  # told to stop
    KILLED = "killed"  # hard limit or shutdown: terminate frame / SIGKILL under way
    DEAD = "dead"


class _Job:
    __slots__ = ("child", "ctx", "envelope", "frame", "future", "hard", "on_timeout",
                 "revoking", "seq", "soft", "soft_fired", "started", "timer")

    def __init__(self, seq: int, envelope: Envelope, ctx: TaskContext, soft: float | None,
                 hard: float | None, future: asyncio.Future[Any],
                 on_timeout: TimeoutCallback) -> None:
        self.seq = seq
        self.envelope = envelope
        self.ctx = ctx
        self.soft = soft
        self.hard = hard
        self.future = future
        self.on_timeout = on_timeout
        self.frame = frame({"t": "run", "seq": seq, "env": envelope.to_dict(), "soft": soft})
        self.child: _Child | None = None
        self.started: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.soft_fired = False
        self.revoking = False

    @property
    def settled(self) -> bool:
        return self.future.done()

    def settle(self, value: Any = None, exc: BaseException | None = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(value)


class _Child:
    __slots__ = ("exited", "fatal", "outstanding", "pid", "proc", "ready", "sent", "socket_closed",
                 "state", "task", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.state = _State.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.transport: asyncio.Transport | None = None
        self.outstanding: deque[_Job] = deque()
        self.sent = 0
        self.fatal: str | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        # Retrieved here so a lazily started pool that nobody awaits logs no warning.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.socket_closed = asyncio.Event()
        self.exited = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class _ChildProtocol(asyncio.Protocol):
    def __init__(self, pool: ProcessPool, child: _Child) -> None:
        self._pool = pool
        self._child = child
        self._reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except Exception as exc:  # a corrupt stream: this child is no use any more
            log.error("pool.bad_frame", pid=self._child.pid, error=repr(exc))
            if self._child.outstanding:
                self._child.outstanding[0].settle(exc=WorkerLostError(
                    f"child pid {self._child.pid} sent a corrupt message: {exc!r}"))
            self._pool._kill(self._child)
            return
        for msg in messages:
            try:
                self._pool._on_message(self._child, msg)
            except Exception as exc:
                log.error("pool.message_failed", pid=self._child.pid, type=msg.get("t"),
                          error=repr(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self._child.socket_closed.set()


class ProcessPool:
    """Runs prepared tasks in child processes; see the module docstring.

    :meth:`run` returns an :class:`~stem.worker.processor.EncodedResult` or raises
    TimeLimitExceeded, WorkerLostError, RemoteError or Retry. Use on one event loop.
    Counters: ``recycled`` (children retired by the max-tasks/memory limits), ``lost``
    (children that died unexpectedly), ``revoked`` (tasks taken back from behind a
    long task).
    """

    def __init__(self, app: Stem, config: PoolConfig) -> None:
        self.app = app
        self.config = config
        self._spec: str | None = config.app_spec
        self._children: list[_Child] = []
        self._pending: deque[_Job] = deque()
        self._seq = itertools.count(1)
        self._rid_tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closing = False
        self._pump_scheduled = False
        self._start_error: str | None = None
        self._failures = 0
        self._respawn: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.recycled = 0
        self.revoked = 0
        self.lost = 0

    # -- introspection (tests, stats) -----------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Pids of the children that take work (starting or ready)."""
        return [c.pid for c in self._children
                if c.state in (_State.STARTING, _State.READY) and c.pid is not None]

    @property
    def ready_count(self) -> int:
        """Children ready for work."""
        return sum(1 for c in self._children if c.state is _State.READY)

    # -- lifecycle ------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            if self._spec is None:
                self._spec = infer_app_spec(self.app)
            self._replenish()

    async def start(self) -> None:
        """Start the children and wait until they have imported the app.

        Raises ConfigurationError when a child cannot start (bad app spec, import error).
        """
        self._ensure_started()
        starting = [c.ready for c in self._children if not c.ready.done()]
        if starting:
            await asyncio.wait(starting, timeout=self.config.start_timeout)
        if self.ready_count == 0:
            raise ConfigurationError(
                f"the process pool could not start: {self._start_error or 'timed out'}"
            )
        log.info("pool.started", size=self.config.size, pids=self.pids, app=self._spec)

    def _replenish(self) -> None:
        if self._closing or self._respawn is not None:
            return
        live = sum(1 for c in self._children if c.state in (_State.STARTING, _State.READY))
        for _ in range(self.config.size - live):
            self._spawn()

    def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        child = _Child(loop)
        self._children.append(child)
        child.task = loop.create_task(self._run_child(child))

    def _child_command(self, fd: int) -> list[str]:
        # The stem package's parent directory goes first so the child imports this
        # very stem even when the worker's sys.path was set up by hand; the full
        # sys.path follows in the init frame.
        root = str(Path(__file__).resolve().parents[2])
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from stem.worker._child import main; sys.exit(main())")
        return [sys.executable, "-c", code, str(fd)]

    async def _run_child(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        returncode: int | None = None
        try:
            try:
                with _group_signals_blocked():
                    child.proc = await asyncio.create_subprocess_exec(
                        *self._child_command(child_sock.fileno()),
                        pass_fds=(child_sock.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                    )
            finally:
                child_sock.close()
            child.pid = child.proc.pid
            transport, _ = await loop.connect_accepted_socket(
                lambda: _ChildProtocol(self, child), parent_sock)
            child.transport = transport
            child.write(frame({
                "t": "init", "app": self._spec, "path": list(sys.path),
                "rss": self.config.max_memory_per_child is not None,
            }))
            if child.state is _State.KILLED:  # killed while we were starting it
                await self._terminate(child)
            returncode = await child.proc.wait()
            # Everything the child wrote before exiting is read before we judge its exit.
            with suppress(TimeoutError):
                await wait_event(child.socket_closed, 1.0)
        except asyncio.CancelledError:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.kill()
            raise
        except Exception as exc:
            child.fatal = child.fatal or f"could not start a child process: {exc!r}"
        finally:
            if child.transport is not None:
                child.transport.close()
            else:
                parent_sock.close()
            child.exited.set()
        self._on_exit(child, returncode)

    def _on_exit(self, child: _Child, returncode: int | None) -> None:
        previous = child.state
        child.state = _State.DEAD
        with suppress(ValueError):
            self._children.remove(child)
        jobs = [j for j in child.outstanding if not j.settled]
        child.outstanding.clear()
        if previous is _State.STARTING:
            self._startup_failed(
                child, child.fatal or f"child pid {child.pid} exited with "
                                      f"{describe_exit(returncode)} before it was ready")
        elif self._closing:
            for job in jobs:
                job.settle(exc=WorkerLostError(
                    f"child pid {child.pid} stopped with the worker while running task "
                    f"{job.envelope.name} ({job.envelope.id})"))
        elif previous is not _State.KILLED and (jobs or previous is not _State.STOPPING):
            self.lost += 1
            log.warning("pool.child_lost", pid=child.pid, exit=describe_exit(returncode),
                        task_id=jobs[0].envelope.id if jobs else None)
            if jobs:
                head = jobs[0]
                head.settle(exc=WorkerLostError(
                    f"child pid {child.pid} exited with {describe_exit(returncode)} while "
                    f"running task {head.envelope.name} ({head.envelope.id})"))
                self._requeue(jobs[1:])
        else:
            self._requeue(jobs)
        self._replenish()
        self._schedule_pump()

    def _startup_failed(self, child: _Child, message: str) -> None:
        self._start_error = message
        self._failures += 1
        if not child.ready.done():
            child.ready.set_exception(ConfigurationError(message))
        if self._closing:
            return
        log.error("pool.child_start_failed", error=message, attempts=self._failures)
        if self.ready_count == 0:
            while self._pending:
                self._pending.popleft().settle(
                    exc=WorkerLostError(f"the process pool could not start a child: {message}"))
        # Back off so an app that can't be imported does not turn into a fork loop.
        delay = min(30.0, 0.5 * 2 ** min(self._failures, 6))
        self._respawn = asyncio.get_running_loop().call_later(delay, self._respawn_now)

    def _respawn_now(self) -> None:
        self._respawn = None
        self._replenish()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop every child: idle ones exit cleanly, busy ones are killed; fail what's left."""
        self._closing = True
        for handle in (self._respawn, self._watchdog):
            if handle is not None:
                handle.cancel()
        self._respawn = self._watchdog = None
        while self._pending:
            self._pending.popleft().settle(exc=WorkerLostError("the process pool was closed"))
        for child in list(self._children):
            if child.outstanding or child.transport is None:  # busy (maybe abandoned work)
                self._kill(child)
            elif child.state in (_State.STARTING, _State.READY, _State.RETIRING):
                self._stop(child)
        tasks = [c.task for c in self._children if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for child in self._children:
            for job in child.outstanding:
                job.settle(exc=WorkerLostError("the process pool was closed"))
        for t in list(self._rid_tasks):
            t.cancel()

    # -- dispatch -------------------------------------------------------------------------

    async def run(self, prepared: Prepared, ctx: TaskContext, *, soft: float | None,
                  hard: float | None, on_timeout: TimeoutCallback) -> Any:
        """Run one attempt in a child; returns an EncodedResult (see the class docstring)."""
        if self._closing:
            raise WorkerLostError("the process pool is closed")
        self._ensure_started()
        if self._start_error is not None and self.ready_count == 0:
            raise WorkerLostError(f"the process pool could not start a child: {self._start_error}")
        loop = asyncio.get_running_loop()
        job = _Job(next(self._seq), prepared.envelope, ctx, soft, hard, loop.create_future(),
                   on_timeout)
        self._pending.append(job)
        self._schedule_pump()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The attempt was abandoned (worker shutdown); a child still running it is
            # killed by close(). Not yet sent: forget it.
            with suppress(ValueError):
                self._pending.remove(job)
            raise

    def terminate(self, task_id: str, exc: BaseException) -> bool:
        """Stop the attempt of ``task_id`` now (a terminating revoke): its :meth:`run`
        raises ``exc``. A child running it is killed and replaced (the work queued
        behind it goes to other children); one not yet started is dropped. False when
        no attempt of ``task_id`` is here."""
        for job in list(self._pending):
            if job.envelope.id == task_id and not job.settled:
                self._pending.remove(job)
                job.settle(exc=exc)
                return True
        for child in self._children:
            for i, job in enumerate(child.outstanding):
                if job.envelope.id != task_id or job.settled:
                    continue
                job.settle(exc=exc)
                if i == 0 and child.state not in (_State.KILLED, _State.DEAD):
                    self._kill(child)  # it is running there: only killing stops it
                return True
        return False

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._closing:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        pending = self._pending
        while pending and pending[0].settled:
            pending.popleft()
        now = asyncio.get_running_loop().time()
        usable = [
            c for c in self._children
            if c.state is _State.READY and (
                not c.outstanding or now - (c.outstanding[0].started or now) < LONG_TASK)
        ]
        if not pending or not usable:
            return
        # Spread the work: each child queues its share, at most max_batch, at least one.
        total = len(pending) + sum(len(c.outstanding) for c in usable)
        window = min(self.config.max_batch, max(1, -(-total // len(usable))))
        out: dict[int, tuple[_Child, list[bytes]]] = {}
        while pending and usable:
            child = min(usable, key=lambda c: len(c.outstanding))
            if len(child.outstanding) >= window:
                break
            job = pending.popleft()
            if job.settled:
                continue
            self._assign(child, job)
            out.setdefault(id(child), (child, []))[1].append(job.frame)
            if child.state is not _State.READY:
                usable.remove(child)
        for child, frames in out.values():
            child.write(b"".join(frames))

    def _assign(self, child: _Child, job: _Job) -> None:
        job.child = child
        child.outstanding.append(job)
        child.sent += 1
        if len(child.outstanding) == 1:
            self._started_now(job)
        elif self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(LONG_TASK / 2, self._watch)
        limit = self.config.max_tasks_per_child
        if limit is not None and child.sent >= limit:
            self._retire(child, "max_tasks_per_child")

    def _started_now(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        job.started = loop.time()
        if job.hard is not None and job.timer is None:
            job.timer = loop.call_at(job.started + job.hard, self._hard_expired, job)

    def _watch(self) -> None:
        """Revoke the work queued behind tasks that turned out long (see LONG_TASK)."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        again = False
        for child in self._children:
            if len(child.outstanding) < 2 or child.state not in (_State.READY, _State.RETIRING):
                continue
            head = child.outstanding[0]
            if head.started is None or now - head.started < LONG_TASK:
                again = True
                continue
            seqs = []
            for job in itertools.islice(child.outstanding, 1, None):
                if not job.revoking:
                    job.revoking = True
                    seqs.append(job.seq)
            if seqs:
                child.write(frame({"t": "revoke", "seqs": seqs}))
        if again and not self._closing:
            self._watchdog = loop.call_later(LONG_TASK / 2, self._watch)

    def _on_revoked(self, child: _Child, seqs: list[int]) -> None:
        wanted = set(seqs)
        jobs = [j for j in child.outstanding if j.seq in wanted]
        for job in jobs:
            child.outstanding.remove(job)
            child.sent -= 1
        self.revoked += len(jobs)
        self._requeue(jobs)
        self._schedule_pump()

    def _requeue(self, jobs: list[_Job]) -> None:
        # Never started (queued in a child that is gone, or revoked): back to the front.
        for job in reversed(jobs):
            if not job.settled:
                job.child, job.started, job.revoking = None, None, False
                if job.timer is not None:
                    job.timer.cancel()
                    job.timer = None
                self._pending.appendleft(job)

    def _retire(self, child: _Child, reason: str) -> None:
        if child.state is not _State.READY:
            return
        child.state = _State.RETIRING
        self.recycled += 1
        log.info("pool.child_recycled", pid=child.pid, reason=reason, tasks=child.sent)
        self._replenish()
        if not child.outstanding:
            self._stop(child)

    def _stop(self, child: _Child) -> None:
        child.state = _State.STOPPING
        child.write(frame({"t": "stop"}))

    def _kill(self, child: _Child) -> None:
        """Take ``child`` out of service now: requeue its unstarted work, terminate it."""
        if child.state in (_State.KILLED, _State.DEAD):
            return
        child.state = _State.KILLED
        jobs = [j for j in child.outstanding if not j.settled]
        child.outstanding.clear()
        if self._closing:
            for job in jobs:
                job.settle(exc=WorkerLostError("the process pool was closed"))
        else:
            # The head (if any) was already settled by whoever killed the child.
            self._requeue(jobs)
        if child.proc is not None:
            task = asyncio.get_running_loop().create_task(self._terminate(child))
            self._rid_tasks.add(task)
            task.add_done_callback(self._rid_tasks.discard)
        self._replenish()
        self._schedule_pump()

    async def _terminate(self, child: _Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        # Not SIGTERM: the child drops that one (it may come from the process group).
        child.write(frame({"t": "terminate"}))
        try:
            await asyncio.wait_for(child.exited.wait(), self.config.kill_grace)
        except TimeoutError:
            with suppress(ProcessLookupError):
                proc.kill()

    def _hard_expired(self, job: _Job) -> None:
        job.timer = None
        child = job.child
        if job.settled or child is None or not child.outstanding or child.outstanding[0] is not job:
            return
        assert job.hard is not None
        job.on_timeout(job.hard, True)
        job.settle(exc=TimeLimitExceeded(
            f"{hard_limit_message(job.envelope, job.hard)}; child pid {child.pid} was killed"))
        self._kill(child)

    # -- messages from children -----------------------------------------------------------

    def _on_message(self, child: _Child, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "done":
            self._on_done(child, msg)
            return
        if kind == "ready":
            child.state = _State.READY
            child.pid = msg.get("pid", child.pid)
            self._start_error = None
            self._failures = 0
            if not child.ready.done():
                child.ready.set_result(None)
            self._schedule_pump()
            return
        if kind == "fatal":
            child.fatal = str(msg.get("error"))
            return
        if kind == "revoked":
            self._on_revoked(child, msg.get("seqs", []))
            return
        job = self._find(child, msg.get("seq"))
        if kind == "enqueue":
            self._enqueue(child, job, msg)
            return
        if job is None or job.settled:
            return
        if kind == "soft":
            if not job.soft_fired and job.soft is not None:
                job.soft_fired = True
                job.on_timeout(job.soft, False)
        elif kind == "progress":
            if msg.get("meta"):
                job.ctx.meta.update(msg["meta"])
            job.ctx.progress(msg["pct"], msg.get("data"))
        elif kind == "lease":
            seconds = msg.get("s")
            if seconds is None:
                job.ctx.heartbeat()
            else:
                job.ctx.extend_lease(float(seconds))

    @staticmethod
    def _find(child: _Child, seq: Any) -> _Job | None:
        for job in child.outstanding:
            if job.seq == seq:
                return job
        return None

    def _on_done(self, child: _Child, msg: dict[str, Any]) -> None:
        job = self._find(child, msg.get("seq"))
        if job is None:
            return  # settled and forgotten already (killed at its hard limit)
        was_head = child.outstanding[0] is job
        child.outstanding.remove(job)
        if was_head and child.outstanding:
            self._started_now(child.outstanding[0])
        if msg.get("meta"):
            job.ctx.meta.update(msg["meta"])
        if "err" in msg:
            job.settle(exc=_remote_exception(msg))
        else:
            job.settle(EncodedResult(msg.get("ok"), msg.get("enc", "json")))
        limit = self.config.max_memory_per_child
        rss = msg.get("rss")
        if limit is not None and rss is not None and rss > limit:
            self._retire(child, f"max_memory_per_child ({rss} KiB > {limit} KiB)")
        if child.state is _State.RETIRING and not child.outstanding:
            self._stop(child)
        self._schedule_pump()

    def _enqueue(self, child: _Child, job: _Job | None, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")

        async def publish() -> None:
            try:
                call = call_from_wire(self.app, msg["call"])
                reply: dict[str, Any] = {"t": "reply", "rid": rid,
                                         "id": await self.app.enqueue_call(call)}
            except Exception as exc:
                reply = {"t": "reply", "rid": rid, "err": f"{type(exc).__name__}: {exc}"}
            child.write(frame(reply))

        task = asyncio.get_running_loop().create_task(publish())
        self._rid_tasks.add(task)
        task.add_done_callback(self._rid_tasks.discard)


def _remote_exception(msg: dict[str, Any]) -> BaseException:
    kind = msg.get("kind") or {}
    reject = kind.get("reject")
    error = RemoteError(TaskError.from_dict(msg["err"]), type_names=kind.get("names"),
                        retryable=kind.get("retryable") is not False,
                        reject=reject if isinstance(reject, str) else None,
                        reject_dead_letter=kind.get("deadLetter") is True)
    retry = msg.get("retry")
    if retry is None:
        return error
    eta = retry.get("eta")
    policy = retry.get("retry_policy")
    return Retry(
        retry.get("message"),
        countdown=retry.get("countdown"),
        eta=from_iso(eta) if eta else None,
        exc=error,
        max_retries=retry.get("max_retries"),
        time_limit=retry.get("time_limit"),
        soft_time_limit=retry.get("soft_time_limit"),
        retry_policy=RetryPolicy.from_meta(policy) if policy else None,
    )

