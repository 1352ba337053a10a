"""The worker's side of the control plane: it answers commands read from the control
channel (see :mod:`stem.control`) and writes a heartbeat every
``STEM_HEARTBEAT_INTERVAL`` seconds (10 by default) to the result backend's store.

Commands (the Dart Stem's names, payloads and replies): ``ping``, ``stats``,
``inspect``, ``revoke`` (entries already stored by the caller: applied now instead of
at the next sync), ``queue_pause`` / ``queue_resume`` (likewise: pause entries in the
revoke store, so a pause outlives worker restarts), ``queue_status`` and ``shutdown``
(``warm``: finish in-flight work however long it takes; ``soft``: the worker's grace,
then requeue; ``hard``: requeue in-flight work now). The ``control_command_received``
and ``control_command_completed`` signals fire around each.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from stem import signals
from stem._aio import cancel_and_wait
from stem._time import now_iso
from stem.control import (
    SHUTDOWN_MODES,
    decode,
    encode,
    signature_problem,
    store_part,
)
from stem.log import get_logger
from stem.ports import ControlChannel, HeartbeatStore
from stem.revoke import RevokeEntry

if TYPE_CHECKING:
    from stem.worker.worker import Worker

log = get_logger(__name__)

#: A heartbeat is kept this many intervals: a worker that died without stopping shows
#: as stale (after two intervals) for a while, then disappears.
HEARTBEAT_TTL_INTERVALS = 10


class WorkerControl:
    """Runs the command loop and the heartbeat loop of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.started = time.time()
        self.interval = 10.0  # the worker's heartbeat_interval, read at start
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: ControlChannel | None = None
        self._beats: HeartbeatStore | None = None

    @property
    def worker_id(self) -> str:
        return self.worker.consumer_name

    async def start(self) -> None:
        """Subscribe (from now on) and write the first heartbeat; never raises."""
        app = self.worker.app
        self.interval = self.worker.heartbeat_interval
        self._channel = store_part(app.broker_store, "control")
        for store in (app.backend_store, app.broker_store):
            self._beats = store_part(store, "heartbeats")
            if self._beats is not None:
                break
        if self._channel is not None:
            try:
                pos = await self._channel.position()
            except Exception as exc:
                log.error("worker.control_unavailable", error=repr(exc))
                pos = None
            self._tasks.append(asyncio.create_task(self._serve(pos)))
        if self._beats is not None:
            self._tasks.append(asyncio.create_task(self._heartbeats()))

    async def stop(self) -> None:
        """Stop both loops; remove this worker's heartbeat."""
        await cancel_and_wait(*self._tasks)
        if self._beats is not None:
            try:
                await asyncio.wait_for(self._beats.remove(self.worker_id), 2)
            except Exception as exc:
                log.debug("worker.heartbeat_remove_failed", error=repr(exc))

    # -- heartbeats ---------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """This worker's heartbeat (the Dart ``WorkerHeartbeat`` fields and more)."""
        w = self.worker
        return {"workerId": self.worker_id, "namespace": w.app.namespace,
                "timestamp": now_iso(), "timestampEpoch": time.time(),
                "host": socket.gethostname(), "pid": os.getpid(),
                "queues": list(w.queues), "pausedQueues": sorted(w.revocations.paused),
                "inflight": len(w._active), "concurrency": w.concurrency,
                "processed": w.processed, "failed": w.failed,
                "uptimeMs": round((time.time() - self.started) * 1000),
                "intervalMs": round(self.interval * 1000)}

    async def _heartbeats(self) -> None:
        assert self._beats is not None
        failing = False
        while True:
            try:
                await self._beats.put(self.worker_id, encode(self.heartbeat()),
                                      HEARTBEAT_TTL_INTERVALS * self.interval)
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("worker.heartbeat_failed", error=repr(exc))
                failing = True
            await asyncio.sleep(self.interval)

    # -- commands -----------------------------------------------------------------------

    async def _serve(self, pos: str | None) -> None:
        channel = self._channel
        assert channel is not None
        failing = False
        while True:
            try:
                if pos is None:
                    pos = await channel.position()
                pos, raws = await channel.read(pos, 1.0)
                failing = False
            except Exception as exc:
                if not failing:
                    log.error("worker.control_read_failed", error=repr(exc))
                failing = True
                await asyncio.sleep(1.0)
                continue
            for raw in raws:
                msg = decode(raw)
                if msg is None or msg.get("kind") != "command" or not self._mine(msg):
                    continue
                try:
                    await self._handle(channel, msg)
                except Exception as exc:
                    log.error("worker.control_reply_failed", error=repr(exc))

    def _mine(self, msg: dict[str, Any]) -> bool:
        if msg.get("namespace", self.worker.app.namespace) != self.worker.app.namespace:
            return False
        targets = msg.get("targets") or ["*"]
        return "*" in targets or self.worker_id in targets

    async def _handle(self, channel: ControlChannel, msg: dict[str, Any]) -> None:
        w = self.worker
        kind = str(msg.get("type"))
        payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
        signals.control_command_received.send(w, command=kind, payload=payload, message=msg)
        reply: dict[str, Any] = {"kind": "reply", "requestId": msg.get("requestId"),
                                 "workerId": self.worker_id}
        after = None
        problem = signature_problem(msg, w.app.signer)
        if problem is not None:
            log.warning("worker.control_refused", command=kind, problem=problem)
            reply.update(status="error", payload={}, error=f"refused: {problem}")
        else:
            try:
                body, after = self._run(kind, payload or {})
                reply.update(status="ok", payload=body)
            except Exception as exc:
                reply.update(status="error", payload={}, error=str(exc) or type(exc).__name__)
        await channel.publish(encode(reply))
        signals.control_command_completed.send(w, command=kind, payload=payload, message=msg,
                                               status=reply["status"], reply=reply)
        if after is not None:
            after()

    def _run(self, kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        w = self.worker
        if kind == "ping":
            return {"timestamp": now_iso(), "queue": w.queues[0] if w.queues else None,
                    "inflight": len(w._active), "subscriptions": {"queues": list(w.queues)}}, None
        if kind == "stats":
            return self.stats(), None
        if kind == "inspect":
            body: dict[str, Any] = {"timestamp": now_iso(), "inflight": len(w._active),
                                    "active": self.active(running_status=True),
                                    "pausedQueues": sorted(w.revocations.paused)}
            if payload.get("includeRevoked", True):
                body["revoked"] = [e.to_json() for e in w.revocations.tasks.values()]
            return body, None
        if kind == "revoke":
            entries = _entries(payload.get("revocations"), w.app.namespace)
            w.revocations.apply(entries)
            running = [e.task_id for e in entries if e.task_id in w.running.by_id]
            return {"tasks": [e.task_id for e in entries], "revoked": len(entries),
                    "inflight": running, "latestVersion": w.revocations.latest,
                    "namespace": w.app.namespace}, None
        if kind in ("queue_pause", "queue_resume"):
            entries = _entries(payload.get("entries"), w.app.namespace)
            w.revocations.apply(entries)
            queues = payload.get("queues") or []
            return {"queues": queues, "updated": len(entries), "persisted": True,
                    "paused": sorted(w.revocations.paused), "namespace": w.app.namespace}, None
        if kind == "queue_status":
            return {"namespace": w.app.namespace, "paused": sorted(w.revocations.paused),
                    "subscriptions": {"queues": list(w.queues)}}, None
        if kind == "shutdown":
            mode = SHUTDOWN_MODES.get(str(payload.get("mode", "warm")))
            if mode is None:
                raise ValueError(f"unknown shutdown mode {payload.get('mode')!r}; "
                                 "use warm, soft or hard")
            status = "in-progress" if w.stopping else "initiated"
            return ({"status": status, "mode": mode, "active": len(w.running.by_id)},
                    lambda: w.shutdown(mode))
        raise ValueError(f"Unknown control command {kind}")

    def active(self, *, running_status: bool = False) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for run in list(self.worker.running.by_id.values()):
            env = run.envelope
            item: dict[str, Any] = {"id": env.id, "task": env.name, "queue": env.queue,
                                    "attempt": env.attempt,
                                    "runtimeMs": round((now - run.started) * 1000),
                                    "startedAt": time.strftime(
                                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started))}
            if running_status:
                item["status"] = "running"
            out.append(item)
        return out

    def stats(self) -> dict[str, Any]:
        w = self.worker
        per_queue: dict[str, int] = dict.fromkeys(w.queues, 0)
        for f in list(w._active.values()):
            per_queue[f.delivery.queue] = per_queue.get(f.delivery.queue, 0) + 1
        pool = w.executor.process_pool
        return {"timestamp": now_iso(), "namespace": w.app.namespace,
                "queue": w.queues[0] if w.queues else None, "host": socket.gethostname(),
                "pid": os.getpid(), "concurrency": w.concurrency,
                "maxConcurrency": w.concurrency, "autoscaleEnabled": False,
                "prefetch": w.concurrency * w.prefetch_multiplier,
                "inflight": len(w._active), "queues": per_queue,
                "pausedQueues": sorted(w.revocations.paused), "active": self.active(),
                "subscriptions": {"queues": list(w.queues)}, "processed": w.processed,
                "failed": w.failed,
                "pool": {"kind": "process" if w.pool_size is not None else "thread",
                         "processes": len(pool.pids) if pool is not None else 0},
                "uptimeMs": round((time.time() - self.started) * 1000)}


def _entries(raw: Any, namespace: str) -> list[RevokeEntry]:
    out = []
    for item in raw if isinstance(raw, list) else []:
        try:
            entry = RevokeEntry.from_json(item)
        except ValueError:
            continue
        if entry.namespace == namespace:
            out.append(entry)
    return out
