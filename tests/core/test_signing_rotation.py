"""Key rotation as docs/security.md describes it, with live workers on Redis: producers
keep enqueueing (some tasks delayed, some retrying) while the workers are replaced stage
by stage, and not one task is refused."""

from __future__ import annotations

import asyncio
from typing import Any

import stem
from stem import SigningConfig, TaskState
from stem.worker.worker import Worker

OLD, NEW = b"o" * 32, b"n" * 32


def _app(url: str, namespace: str, keys: dict[str, bytes], active: str) -> stem.Stem:
    app = stem.Stem("rot", broker=url, backend=url, namespace=namespace,
                    signing=SigningConfig(keys=keys, active_key=active))

    @app.task(name="rot.work", max_retries=2)
    def work(ctx: stem.TaskContext, n: int) -> int:
        if n % 5 == 0 and ctx.attempt == 0:
            raise stem.Retry(countdown=0.3)  # the worker signs the retry
        return n

    return app


class _Running:
    def __init__(self, app: stem.Stem) -> None:
        self.app = app
        self.worker = Worker(app, block_time=0.1, shutdown_grace=5.0, concurrency=4)
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        self.worker.request_stop()
        await asyncio.wait_for(self.task, 15)


async def _enqueue(producer: stem.Stem, start: int, count: int, delayed: int) -> list[str]:
    ids = [await producer.enqueue("rot.work", n=n) for n in range(start, start + count)]
    ids += [await producer.enqueue_call(producer.definition("rot.work").call(n=n)
                                        .with_options(countdown=1.0))
            for n in range(start + count, start + count + delayed)]
    return ids


async def test_rotation_with_live_workers_refuses_nothing(redis_url: str, namespace: str) -> None:
    both = {"old": OLD, "new": NEW}
    apps: list[stem.Stem] = []

    def make(keys: dict[str, bytes], active: str) -> stem.Stem:
        apps.append(_app(redis_url, namespace, keys, active))
        return apps[-1]

    # Before: everything signs and verifies with "old".
    producer = make({"old": OLD}, "old")
    a = _Running(make({"old": OLD}, "old"))
    ids = await _enqueue(producer, 0, 20, 5)
    # 1. Add the new key to every worker (rolling restart, active key unchanged).
    b = _Running(make(both, "old"))
    await a.stop()
    ids += await _enqueue(producer, 100, 20, 5)
    # 2. Switch the active key: producers, and workers (they sign retries).
    producer = make(both, "new")
    c = _Running(make(both, "new"))
    await b.stop()
    ids += await _enqueue(producer, 200, 20, 5)
    # 3. Drain: every envelope signed with "old" (delayed ones, retries) has run.
    await asyncio.wait_for(asyncio.gather(*(producer.wait(i) for i in ids)), 30)
    # 4. Remove the old key.
    producer = make({"new": NEW}, "new")
    d = _Running(make({"new": NEW}, "new"))
    await c.stop()
    late = await _enqueue(producer, 300, 20, 5)
    results = await asyncio.wait_for(asyncio.gather(*(producer.wait(i) for i in late)), 30)
    await d.stop()

    everything: list[Any] = [await producer.get_result(i) for i in ids + late]
    assert [r for r in everything if r is None or r.state is not TaskState.SUCCEEDED] == []
    assert len(results) == 25
    assert sum(app.signer.invalid for app in apps if app.signer is not None) == 0
    assert await producer.broker.dead_letters("default") == []
    for app in apps:
        await app.close()
