"""The Redis adapters on a real 3-master Redis Cluster started on loopback ports.

Every queue's keys share one hash tag, so scripts run on the node owning that slot;
queues are picked so that they live on different nodes, and the whole flow
(publish, multi-queue blocking fetch, ack, delayed retry, lease reclaim, dead
letters, NOSCRIPT reload, result wait) runs across them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from stem._time import from_epoch, now_epoch, utcnow
from stem.adapters import backend_from_url, broker_from_url
from stem.adapters.redis import RedisBackend, RedisBroker
from stem.envelope import Envelope
from stem.status import TaskState, TaskStatus
from tests import services
from tests.helpers import eventually, wait_until

pytestmark = pytest.mark.redis


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(n: int) -> list[int]:
    """Ports whose cluster-bus twins (port + 10000) are free as well."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 45000)
        if p not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
    return ports


def _redis_cli() -> str:
    beside = Path(services.redis_server_binary()).with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if not found:
        raise RuntimeError("no redis-cli next to redis-server or on PATH")
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[int]]:
    """Three masters, no replicas, all slots assigned; torn down afterwards."""
    ports = _cluster_ports(3)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            services.start_redis(
                port,
                extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-node-timeout", "5000"],
            )
            procs.append(services._started[-1])
        subprocess.run(
            [_redis_cli(), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            for port in ports:
                info = redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER INFO")
                state = info.get("cluster_state") if isinstance(info, dict) else info
                if "ok" not in str(state):
                    return False
            return True

        wait_until(ready, timeout=30, interval=0.1)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc in services._started:
                services._started.remove(proc)


def _node_of(ports: list[int], key: str) -> int:
    """Port of the master owning ``key`` (the others answer MOVED)."""
    for port in ports:
        try:
            redis.Redis(port=port).get(key)
        except redis.exceptions.MovedError:
            continue
        return port
    raise AssertionError(f"no node owns {key!r}")


@pytest.fixture
def queues(cluster: list[int], namespace: str) -> list[str]:
    """Four queues spread over at least two different nodes."""
    names = [f"q{i}" for i in range(4)]
    nodes = {_node_of(cluster, "{" + f"{namespace}:{q}" + "}") for q in names}
    assert len(nodes) >= 2, "queue names all landed on one node; pick others"
    return names


@pytest.fixture
async def broker(cluster: list[int], namespace: str) -> AsyncIterator[RedisBroker]:
    url = f"redis://127.0.0.1:{cluster[0]}?cluster=1&claim_interval=0.05"
    b = broker_from_url(url, namespace=namespace)
    assert isinstance(b, RedisBroker)
    yield b
    await b.close()


def env(queue: str, i: int = 0, **kw: object) -> Envelope:
    return Envelope(name="t.task", args={"i": i}, queue=queue, **kw)  # type: ignore[arg-type]


async def test_end_to_end_across_nodes(broker: RedisBroker, queues: list[str]) -> None:
    await broker.ping()
    await broker.publish([env(q, i, priority=i % 3) for q in queues for i in range(25)])
    for q in queues:
        assert (await broker.stats(q)).pending == 25
    got = []
    while batch := await broker.fetch(queues, 40, block=0, consumer="c1"):
        got.extend(batch)
        await broker.ack(batch)
    assert len(got) == 100 and {d.queue for d in got} == set(queues)
    for q in queues:
        s = await broker.stats(q)
        assert (s.pending, s.in_flight) == (0, 0)


async def test_blocking_multi_queue_fetch_wakes_for_a_queue_on_another_node(
    broker: RedisBroker, queues: list[str]
) -> None:
    async def publish_when_blocked() -> None:
        await eventually(lambda: asyncio.sleep(0, len(broker._readers) == len(queues)))
        await broker.publish([env(queues[-1], 7)])

    task = asyncio.create_task(publish_when_blocked())
    start = time.monotonic()
    [d] = await broker.fetch(queues, 10, block=5, consumer="c1")
    await task
    # Woken by the publish, not by the 5 s block running out (no tighter bound: a
    # loaded 2-core CI machine may take a second or two to get all readers blocked).
    assert d.queue == queues[-1] and time.monotonic() - start < 4
    assert not broker._readers  # the other reads were ended, not left hanging
    await broker.ack([d])


async def test_delayed_retry_reclaim_and_dead_letters(broker: RedisBroker, queues: list[str]) -> None:
    q = queues[1]
    await broker.publish([env(q, 1), env(q, 2, visibility_timeout=0.2)])
    [a, b] = await broker.fetch([q], 2, block=0, consumer="c1")
    assert a.envelope is not None
    # retry delayed 200 ms while another fetch is blocked
    fetcher = asyncio.create_task(broker.fetch([q], 2, block=5, consumer="c2"))
    await eventually(lambda: asyncio.sleep(0, bool(broker._readers)))
    start = time.monotonic()
    await broker.retry([(a, a.envelope.copy(attempt=1, not_before=from_epoch(now_epoch() + 0.2)))])
    first = await fetcher
    assert time.monotonic() - start < 0.4
    # whichever came first, both the retry and the reclaimed lease of b arrive
    seen = list(first)
    while len(seen) < 2:
        seen.extend(await broker.fetch([q], 2, block=1, consumer="c2"))
    by_i = {d.envelope.args["i"]: d for d in seen if d.envelope}
    assert by_i[1].envelope is not None and by_i[1].envelope.attempt == 1
    assert by_i[2].redelivered and by_i[2].receipt != b.receipt
    await broker.dead_letter([(by_i[1], "boom")])
    await broker.ack([by_i[2], b])  # b is stale: ignored
    [dl] = await broker.dead_letters(q)
    assert dl.reason == "boom"
    assert await broker.replay_dead_letters(q) == 1
    [again] = await broker.fetch([q], 1, block=0, consumer="c1")
    await broker.ack([again])
    assert await broker.purge_dead_letters(q) == 0
    s = await broker.stats(q)
    assert (s.pending, s.delayed, s.in_flight, s.dead) == (0, 0, 0, 0)


async def test_noscript_on_every_node_is_reloaded(
    broker: RedisBroker, queues: list[str], cluster: list[int]
) -> None:
    await broker.publish([env(q) for q in queues])
    got = await broker.fetch(queues, 10, block=0, consumer="c1")
    for port in cluster:
        redis.Redis(port=port).script_flush()
    await broker.ack(got)
    await broker.publish([env(q, 1, not_before=utcnow() + timedelta(milliseconds=1)) for q in queues])
    await asyncio.sleep(0.01)  # let them come due
    again = await eventually(lambda: broker.fetch(queues, 10, block=0.1, consumer="c1"))
    await broker.ack(again)
    for q in queues:
        assert (await broker.stats(q)).in_flight == 0


async def test_result_backend_on_the_cluster(cluster: list[int], namespace: str) -> None:
    backend = backend_from_url(f"redis://127.0.0.1:{cluster[1]}?cluster=1", namespace=namespace)
    assert isinstance(backend, RedisBackend)
    try:
        await backend.ping()
        ids = [f"task-{i}" for i in range(30)]
        nodes = {_node_of(cluster, backend.key(i)) for i in ids}
        assert len(nodes) >= 2
        waiters = [asyncio.create_task(backend.wait(i, timeout=10)) for i in ids[:5]]
        await backend.set_many([(TaskStatus(i, TaskState.SUCCEEDED, payload=i), 60) for i in ids])
        got = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert [s.payload for s in got if s] == ids[:5]
        many = await backend.get_many([*ids, "missing"])
        assert set(many) == set(ids)
    finally:
        await backend.close()


async def test_ready_data_in_several_queues_ends_every_blocking_read(
    broker: RedisBroker, queues: list[str]
) -> None:
    """All per-queue reads return at once (some before their CLIENT ID is known); the
    surplus over max_count goes back."""
    await broker._ensure_groups(queues)
    await broker.publish([env(q, i) for i, q in enumerate(queues)])
    start = time.monotonic()
    got = await broker._block(queues, 2, "c1", 3.0)
    assert time.monotonic() - start < 1.0 and len(got) == 2
    assert not broker._readers
    rest = await broker.fetch(queues, 10, block=0, consumer="c2")
    assert len(rest) == len(queues) - 2
    await broker.ack(got + rest)


async def test_locks_and_schedules_on_the_cluster(cluster: list[int], namespace: str) -> None:
    from datetime import UTC, datetime, timedelta

    from stem.adapters.redis import RedisStore
    from stem.beat import MarkRun, ScheduleEntry, ScheduleRun

    store = RedisStore(f"redis://127.0.0.1:{cluster[2]}?cluster=1", namespace=namespace)
    try:
        # Lock keys spread over the nodes; each script touches one key.
        keys = [f"lock-{i}" for i in range(12)]
        assert len({_node_of(cluster, store.locks.key(k)) for k in keys}) >= 2  # type: ignore[attr-defined]
        for k in keys:
            assert await store.locks.acquire(k, "a", 30)
            assert not await store.locks.acquire(k, "b", 30)
            assert await store.locks.release(k, "a")
        # Every schedule key has the {<ns>:schedule} hash tag: one slot, so the scripts
        # that touch an entry, the index and the history run on one node.
        schedules = store.schedules
        assert schedules.entry_key("e1").startswith("{" + namespace + ":schedule}:")  # type: ignore[attr-defined]
        t0 = datetime(2001, 1, 1, tzinfo=UTC)
        ids = [f"e{i}" for i in range(6)]
        for n, i in enumerate(ids):
            await schedules.upsert(ScheduleEntry(id=i, task="t", spec={"kind": "interval",
                                   "everyMs": 1000}, next_run_at=t0 + timedelta(seconds=n)))
        assert [e.id for e in await schedules.due(t0 + timedelta(seconds=10))] == ids
        marked = await schedules.mark_run(ScheduleRun("e0", t0, t0, True), expected_version=1,
                                          next_run_at=t0 + timedelta(seconds=100))
        assert marked is not None and marked.version == 2
        assert len(await schedules.history("e0")) == 1
        # A mark_runs batch is one script over the keys of many entries: one slot too.
        batch = await schedules.mark_runs([
            MarkRun(ScheduleRun(i, t0, t0, True), 1, t0 + timedelta(seconds=100))
            for i in ids[1:]])
        assert [m.version if m else None for m in batch] == [2] * 5
        assert await schedules.due(t0 + timedelta(seconds=10)) == []
        assert [e.id for e in await schedules.entries()] == ids
        assert await schedules.remove("e0")
        assert [e.id for e in await schedules.due(t0 + timedelta(seconds=1000))] == ids[1:]
    finally:
        await store.close()
