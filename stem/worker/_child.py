"""One process-pool child (started by :mod:`stem.worker.pool`; argv[1] is its socket fd).

Three threads: the main thread runs tasks one at a time (so signals, which Python
delivers to the main thread, interrupt the task); a reader thread splits incoming
frames into the task inbox and replies to ``enqueue`` requests, hands queued
tasks back when the worker revokes them (it does when the task in front of them
runs long, so they can run in another child), and exits the process when the
worker's end closes (nobody is left to want our results); a writer thread sends
frames. Writes never happen on the main thread, so a signal
raised into a handler can never cut a frame in half, and the writer batches
whatever results are ready into one ``sendall``.

Signals: the worker alone decides when a child stops, so SIGTERM and SIGINT sent to
the whole process group — ``kill -TERM -PGID``, systemd's ``KillMode=control-group``,
a container runtime, Ctrl-C in a terminal — are caught and dropped: the task running
here finishes while the worker drains. (Caught by a handler that does nothing rather
than ``SIG_IGN``, which a task's own subprocesses would inherit through ``exec``.) The
worker starts the child with both signals blocked and it unblocks them once its
handlers are in place, so there is no moment when they would kill it. To end a task
at its hard limit the worker sends a ``terminate`` frame: the reader thread marks the
request and signals the main thread itself (``pthread_kill`` SIGTERM), whose handler
then raises SystemExit so ``finally`` blocks run (a blocking call is interrupted
too); the worker SIGKILLs a child still alive after its grace. SIGALRM is the soft
limit: ``setitimer`` is armed for each task that has one and raises
SoftTimeLimitExceeded in the handler (handlers that use SIGALRM themselves should not
set soft limits).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import queue
import signal
import socket
import sys
import threading
from collections import deque
from types import FrameType
from typing import TYPE_CHECKING, Any

from stem._time import to_iso
from stem.app import Stem
from stem.context import TaskContext
from stem.envelope import Envelope
from stem.errors import SoftTimeLimitExceeded, StemError, TaskArgumentError
from stem.retry import Reject, Retry, exception_names, is_retryable
from stem.status import TaskError
from stem.worker._ipc import GROUP_SIGNALS, FrameReader, call_to_wire, frame
from stem.worker.processor import Prepared, Processor, Rejected, Success
from stem.worker.timelimits import run_coroutine, soft_limit_message

if TYPE_CHECKING:
    from stem.task import TaskCall


class _Terminated(SystemExit):
    """The worker asked this child to die (a ``terminate`` frame at a hard limit)."""


#: Set by the reader thread when the worker sends ``terminate``; the next SIGTERM
#: handled in the main thread (the one the reader sends) raises _Terminated.
_terminate_requested = threading.Event()


def _on_group_signal(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGTERM and _terminate_requested.is_set():
        _terminate_requested.clear()  # once: a later group SIGTERM must not cut cleanup short
        raise _Terminated(128 + signum)
    # Anything else — the group's SIGTERM/SIGINT — is dropped: the worker decides.


def _terminate_main_thread() -> None:
    """Raise _Terminated in the main thread, interrupting a blocking call there."""
    _terminate_requested.set()
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)


def _guard_signals() -> None:
    """Catch (and drop) the group's signals, then unblock them (the worker blocked them)."""
    for sig in GROUP_SIGNALS:
        signal.signal(sig, _on_group_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


class _Inbox:
    """Messages for the main thread, in order; queued tasks can be taken back."""

    def __init__(self) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()

    def put(self, msg: dict[str, Any]) -> None:
        with self._cond:
            self._items.append(msg)
            self._cond.notify()

    def get(self) -> dict[str, Any]:
        """The next message (blocks; a signal handler may interrupt the wait)."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    def revoke(self, seqs: set[int]) -> list[int]:
        """Drop the not-yet-started ``run`` messages among ``seqs``; return their seqs."""
        with self._cond:
            kept: deque[dict[str, Any]] = deque()
            taken: list[int] = []
            for msg in self._items:
                if msg.get("t") == "run" and msg.get("seq") in seqs:
                    taken.append(msg["seq"])
                else:
                    kept.append(msg)
            self._items = kept
            return taken


class _Channel:
    """The socket to the worker: a reader thread, a writer thread, replies by request id."""

    def __init__(self, sock: socket.socket) -> None:

        self._sock = sock
        self.inbox = _Inbox()
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._replies: dict[int, dict[str, Any]] = {}
        self._replied = threading.Condition()
        threading.Thread(target=self._read_loop, name="stem-child-reader", daemon=True).start()
        self._writer = threading.Thread(target=self._write_loop, name="stem-child-writer",
                                        daemon=True)
        self._writer.start()

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one message (TypeError when it is not JSON-serialisable)."""
        self._out.put(frame(msg))

    def wait_reply(self, rid: int) -> dict[str, Any]:
        """Block until the worker answers request ``rid``."""
        with self._replied:
            while rid not in self._replies:
                self._replied.wait()
            return self._replies.pop(rid)

    def close(self) -> None:
        """Flush what is queued and stop the writer."""
        self._out.put(None)
        self._writer.join(10)

    def _read_loop(self) -> None:

        reader = FrameReader()
        while True:
            try:
                data = self._sock.recv(1 << 18)
            except OSError:
                data = b""
            if not data:
                os._exit(0)  # the worker is gone or closed us: finish nothing
            for msg in reader.feed(data):
                kind = msg.get("t")
                if kind == "reply":
                    with self._replied:
                        self._replies[msg["rid"]] = msg
                        self._replied.notify_all()
                elif kind == "terminate":
                    _terminate_main_thread()
                elif kind == "revoke":
                    # Answered from here: the main thread is busy with the long task.
                    taken = self.inbox.revoke(set(msg.get("seqs", ())))
                    if taken:
                        self.send({"t": "revoked", "seqs": taken})
                else:
                    self.inbox.put(msg)

    def _write_loop(self) -> None:
        while True:
            batch = [self._out.get()]
            while True:
                try:
                    batch.append(self._out.get_nowait())
                except queue.Empty:
                    break
            data = b"".join(b for b in batch if b is not None)
            if data:
                try:
                    self._sock.sendall(data)
                except OSError:
                    os._exit(0)
            if None in batch:
                return


_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def rss_kib() -> int:
    """This process's resident memory in KiB (current on Linux; peak elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_KIB
    except (OSError, ValueError, IndexError):
        import resource  # no /proc here: fall back to the peak

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return peak // 1024 if sys.platform == "darwin" else peak


class _ChildOps:
    """TaskContext operations in a child: forwarded to the worker, which owns the broker."""

    def __init__(self, runner: _Runner, seq: int) -> None:
        self._runner = runner
        self._seq = seq

    def extend_lease(self, ctx: TaskContext, seconds: float | None) -> None:
        self._runner.chan.send({"t": "lease", "seq": self._seq, "s": seconds})

    def progress(self, ctx: TaskContext, percent: float, data: Any) -> None:
        msg: dict[str, Any] = {"t": "progress", "seq": self._seq, "pct": percent, "data": data}
        if ctx.meta:
            msg["meta"] = ctx.meta
        self._runner.chan.send(msg)

    def resolve(self, name: str) -> Any:
        return self._runner.app.definition(name)

    async def enqueue_call(self, ctx: TaskContext, call: TaskCall[Any]) -> str:
        # In a thread, so the child's loop (and a soft limit on it) keeps running.
        return await asyncio.get_running_loop().run_in_executor(
            None, self.enqueue_call_sync, ctx, call)

    def enqueue_call_sync(self, ctx: TaskContext, call: TaskCall[Any]) -> str:

        rid = next(self._runner.rids)
        try:
            self._runner.chan.send({"t": "enqueue", "seq": self._seq, "rid": rid,
                                    "call": call_to_wire(call)})
        except TypeError as exc:
            raise TaskArgumentError(
                f"task {call.name!r}: a task enqueued from a process-pool task needs "
                f"JSON-serialisable arguments ({exc})") from None
        reply = self._runner.chan.wait_reply(rid)
        if "err" in reply:
            raise StemError(f"enqueueing {call.name!r} failed in the worker: {reply['err']}")
        return str(reply["id"])


class _Runner:
    """Runs ``run`` messages: prepare, call under the soft limit, encode, reply."""

    def __init__(self, app: Stem, chan: _Channel, report_rss: bool) -> None:

        self.app = app
        self.chan = chan
        self.report_rss = report_rss
        self.processor = Processor(app)
        self.rids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alarm_seq = 0
        self._alarm_message: str | None = None
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:

        message = self._alarm_message
        if message is None:  # the task already returned
            return
        self._alarm_message = None
        self.chan.send({"t": "soft", "seq": self._alarm_seq})
        raise SoftTimeLimitExceeded(message)

    def run(self, msg: dict[str, Any]) -> None:

        seq = msg["seq"]
        ctx: TaskContext | None = None
        reply: dict[str, Any]
        name = "?"
        try:
            env = Envelope.from_dict(msg["env"])
            name = env.name
            # The parent checked the deadline just before sending it here.
            prepared = self.processor.prepare(env, check_expiry=False, verify=False)
            if isinstance(prepared, Rejected):
                reply = {"t": "done", "seq": seq,
                         "err": TaskError(prepared.error_type, prepared.reason).to_dict()}
            else:
                ctx = TaskContext(env, _ChildOps(self, seq))
                value = self._call(prepared, ctx, seq, msg.get("soft"))
                outcome = self.processor.success(prepared, value)
                if isinstance(outcome, Success):
                    reply = {"t": "done", "seq": seq, "ok": outcome.payload,
                             "enc": outcome.encoder_id}
                else:
                    reply = {"t": "done", "seq": seq, "err": outcome.error.to_dict()}
        except _Terminated:
            raise
        except BaseException as exc:  # SystemExit from a task is a failed task, not our exit
            reply = _error_reply(seq, exc)
        if ctx is not None and ctx.meta:
            reply["meta"] = ctx.meta
        if self.report_rss:
            reply["rss"] = rss_kib()
        try:
            self.chan.send(reply)
        except TypeError as exc:
            self.chan.send({"t": "done", "seq": seq, "err": TaskError(
                "PayloadEncodingError",
                f"task {name}: its result or meta is not JSON-serialisable ({exc}); return "
                "JSON values or give the task a result_encoder").to_dict()})

    def _call(self, prepared: Prepared, ctx: TaskContext, seq: int, soft: float | None) -> Any:

        definition = prepared.definition
        func = definition.func
        assert func is not None
        args = [ctx, *prepared.args] if definition.takes_context else prepared.args
        if definition.is_async:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                asyncio.set_event_loop(self._loop)
            coro = func(*args, **prepared.kwargs)
            if soft is None:
                return self._loop.run_until_complete(coro)

            def on_timeout(limit: float, hard: bool) -> None:
                self.chan.send({"t": "soft", "seq": seq})

            return self._loop.run_until_complete(run_coroutine(
                coro, prepared.envelope, soft=soft, hard=None, on_timeout=on_timeout))
        if soft is None:
            return func(*args, **prepared.kwargs)
        self._alarm_seq = seq
        self._alarm_message = soft_limit_message(prepared.envelope, soft)
        signal.setitimer(signal.ITIMER_REAL, soft)
        try:
            return func(*args, **prepared.kwargs)
        finally:
            self._alarm_message = None
            signal.setitimer(signal.ITIMER_REAL, 0)


def _error_reply(seq: int, exc: BaseException) -> dict[str, Any]:
    cause = exc
    reply: dict[str, Any] = {"t": "done", "seq": seq}
    if isinstance(exc, Retry):
        cause = exc.exc if exc.exc is not None else exc
        reply["retry"] = {
            "message": str(exc), "countdown": exc.countdown,
            "eta": to_iso(exc.eta) if exc.eta is not None else None,
            "max_retries": exc.max_retries, "time_limit": exc.time_limit,
            "soft_time_limit": exc.soft_time_limit,
            "retry_policy": exc.retry_policy.to_meta() if exc.retry_policy else None,
        }
    reply["err"] = TaskError.from_exception(cause).to_dict()
    # What the parent's retry filters need, the exception itself cannot cross over.
    kind: dict[str, Any] = {"names": sorted(exception_names(cause)),
                            "retryable": is_retryable(cause)}
    if isinstance(cause, Reject):
        kind["reject"] = cause.reason
        kind["deadLetter"] = cause.dead_letter
    reply["kind"] = kind
    return reply


def _load_app(spec: str) -> Stem:
    module_name, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module_name), attr or "app")
    if not isinstance(obj, Stem):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a stem.Stem app")
    return obj


def main() -> int:
    """Serve the worker on the socket whose fd is ``sys.argv[1]``; returns the exit code."""
    _guard_signals()
    fd = int(sys.argv[1])
    os.set_inheritable(fd, False)  # tasks' own subprocesses must not hold our socket open
    chan = _Channel(socket.socket(fileno=fd))
    init = chan.inbox.get()
    spec = str(init.get("app"))
    try:
        sys.path[:] = [p for p in init.get("path", []) if p not in sys.path[:1]] + sys.path[:1]
        app = _load_app(spec)
        runner = _Runner(app, chan, bool(init.get("rss")))
    except BaseException as exc:
        chan.send({"t": "fatal",
                   "error": f"importing app {spec!r} failed: {type(exc).__name__}: {exc}"})
        chan.close()
        return 1
    chan.send({"t": "ready", "pid": os.getpid()})
    while True:
        msg = chan.inbox.get()
        if msg.get("t") == "stop":
            break
        if msg.get("t") == "run":
            runner.run(msg)
    chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
