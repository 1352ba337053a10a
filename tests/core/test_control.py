"""The control plane with in-process workers (memory): ping/stats/inspect reach every
worker, --worker targets one, pause stops one queue and resume restarts it, shutdown
modes, signals and signed commands."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import stem
from stem import TaskState
from stem.control import ControlClient, encode
from stem.signing import SigningConfig
from stem.testing import eventually
from tests.helpers import running_worker


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}",
                     namespace=namespace)


async def _state(app: stem.Stem, task_id: str, state: TaskState) -> bool:
    status = await app.backend.get(task_id)
    return status is not None and status.state is state


async def test_ping_stats_inspect_reach_every_worker(app: stem.Stem) -> None:
    started, go = asyncio.Event(), asyncio.Event()

    @app.task(name="t.slow")
    async def slow() -> None:
        started.set()
        await go.wait()

    got: list[tuple[str, str]] = []

    def on_done(sender: Any, *, command: str, status: str, **_: Any) -> None:
        got.append((command, status))

    stem.signals.control_command_completed.connect(on_done)
    client = ControlClient(app)
    try:
        async with running_worker(app) as w1, running_worker(app) as w2:
            await eventually(lambda: _workers(client, 2))
            task_id = await slow.enqueue()
            await asyncio.wait_for(started.wait(), 5)
            pings = await client.send("ping", timeout=5)
            assert sorted(r.worker_id for r in pings) == sorted([w1.consumer_name,
                                                                 w2.consumer_name])
            stats = await client.send("stats", timeout=5)
            assert all(r.ok and r.payload["concurrency"] == 16 for r in stats)
            inspect = await client.send("inspect", timeout=5)
            active = [a for r in inspect for a in r.payload["active"]]
            assert [a["id"] for a in active] == [task_id] and active[0]["status"] == "running"
            one = await client.send("ping", targets=[w1.consumer_name], timeout=5)
            assert [r.worker_id for r in one] == [w1.consumer_name]
            bad = await client.send("nonsense", timeout=5)
            assert {r.status for r in bad} == {"error"}
            assert "Unknown control command nonsense" in (bad[0].error or "")
            go.set()
    finally:
        stem.signals.control_command_completed.disconnect(on_done)
    assert ("ping", "ok") in got and ("nonsense", "error") in got


async def _workers(client: ControlClient, n: int) -> bool:
    return len([h for h in await client.workers() if not h.stale]) == n


async def test_pause_stops_one_queue_and_survives_a_restart(app: stem.Stem) -> None:
    @app.task(name="t.a", queue="a")
    async def in_a() -> None:
        return None

    @app.task(name="t.b", queue="b")
    async def in_b() -> None:
        return None

    async with running_worker(app, queues=["a", "b"]) as worker:
        await app.pause_queues(["a"], reason="maintenance")
        await eventually(lambda: _true("a" in worker.revocations.paused))
        held = await in_a.enqueue()
        ran = await in_b.enqueue()
        assert await eventually(lambda: _state(app, ran, TaskState.SUCCEEDED))
        await asyncio.sleep(0.5)
        assert not await _state(app, held, TaskState.SUCCEEDED)
    async with running_worker(app, queues=["a", "b"]) as worker:  # a restart: still paused
        await eventually(lambda: _true("a" in worker.revocations.paused))  # loaded at start
        await asyncio.sleep(0.3)
        assert not await _state(app, held, TaskState.SUCCEEDED)
        await app.resume_queues(["a"])
        assert await eventually(lambda: _state(app, held, TaskState.SUCCEEDED))


async def _true(value: bool) -> bool:
    return value


async def test_shutdown_warm_finishes_in_flight_work(app: stem.Stem) -> None:
    started, go = asyncio.Event(), asyncio.Event()

    @app.task(name="t.slow")
    async def slow() -> str:
        started.set()
        await go.wait()
        return "done"

    worker = stem.worker.Worker(app, block_time=0.1, shutdown_grace=0.1)
    run = asyncio.create_task(worker.run())
    client = ControlClient(app)
    await eventually(lambda: _workers(client, 1))
    task_id = await slow.enqueue()
    await asyncio.wait_for(started.wait(), 5)
    [reply] = await client.send("shutdown", {"mode": "warm"}, timeout=5)
    assert reply.payload == {"status": "initiated", "mode": "warm", "active": 1}
    await asyncio.sleep(0.5)  # longer than the grace: warm waits anyway
    assert not run.done()
    go.set()
    await asyncio.wait_for(run, 10)
    assert await _state(app, task_id, TaskState.SUCCEEDED)
    assert await client.workers() == []  # its heartbeat is removed


async def test_signed_control_commands(namespace: str) -> None:
    key = "a" * 44
    signing = SigningConfig.from_env({"STEM_SIGNING_KEYS": f"k1:{key}",
                                       "STEM_SIGNING_ACTIVE_KEY": "k1"})
    app = stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}",
                    namespace=namespace, signing=signing)
    client = ControlClient(app)
    async with running_worker(app):
        await eventually(lambda: _workers(client, 1))
        [ok] = await client.send("ping", timeout=5)
        assert ok.ok
        # A command without a signature (written by someone without the key) is refused.
        unsigned = client.command("shutdown", {"mode": "hard"})
        pos = await client.channel.position()
        await client.channel.publish(encode(unsigned))
        reply = None
        while reply is None:
            pos, raws = await client.channel.read(pos, 1.0)
            for raw in raws:
                if b'"kind":"reply"' in raw and unsigned["requestId"].encode() in raw:
                    reply = raw
        assert b'"status":"error"' in reply and b"refused: unsigned" in reply
        [still] = await client.send("ping", timeout=5)
        assert still.ok


async def test_a_store_without_control_parts_still_runs_tasks(namespace: str) -> None:
    from stem.adapters._store import BaseStore
    from stem.adapters.memory import (
        MemoryLockStore,
        MemoryScheduleStore,
        backend_from_url,
        broker_from_url,
    )
    from stem.errors import ConfigurationError

    class Bare(BaseStore[Any, Any]):  # an outside adapter predating revokes and control
        def _make_broker(self) -> Any:
            return broker_from_url(self.url, namespace=self.namespace)

        def _make_backend(self) -> Any:
            return backend_from_url(self.url, namespace=self.namespace)

        def _make_locks(self) -> Any:
            return MemoryLockStore()

        def _make_schedules(self) -> Any:
            return MemoryScheduleStore()

    app = stem.Stem("t", broker=Bare(f"memory://{namespace}", namespace), namespace=namespace)

    @app.task(name="t.ok")
    async def ok() -> str:
        return "ok"

    async with running_worker(app):
        task_id = await ok.enqueue()
        assert await eventually(lambda: _state(app, task_id, TaskState.SUCCEEDED))
    with pytest.raises(ConfigurationError, match="revoke store"):
        await app.revoke(task_id)
