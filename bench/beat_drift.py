"""Beat dispatch drift and failover time.

    python -m bench.beat_drift --url redis://127.0.0.1:6379/2 --entries 1000 --seconds 8
    python -m bench.beat_drift --url postgresql://postgres@127.0.0.1:5432/test --failover
    python -m bench.beat_drift --url postgresql://postgres@127.0.0.1:5432/test --record

Drift: N entries due every second, dispatched by one in-process beat whose broker,
backend, schedule store and lock store are all ``--url`` (a new namespace, removed
afterwards). Prints p50/p99/max of how late each run was enqueued after its scheduled
time, over the runs of the window (``--profile`` writes a pyinstrument HTML report), next
to ``floor_ms``: the median time of one ``enqueue_many`` of N tasks on the same store
just before, the part of the drift no beat can avoid on this machine at that moment;
and, per second, the worst enqueue call and the worst start (how late the beat began
the enqueue) over a sample of 50 entries (from their run history).

Recording (``--record``): the time to record one second's runs of N entries, as one
``mark_runs`` batch and as N ``mark_run`` calls (64 in flight, as the beat did before
batches), alternately for ``--rounds`` rounds.

Failover (``--failover``): two real ``stem beat`` processes share the store; an
``every:1s`` entry runs; the beat holding its lock is SIGKILLed, and the time from the
kill until the survivor dispatches is printed (at most about the lock TTL, ``--lock-ttl``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import stem
from stem.adapters import store_from_url
from stem.beat import Beat, MarkRun, ScheduleEntry, ScheduleRun
from stem.beat.beat import LEADER_KEY

ROOT = Path(__file__).resolve().parents[1]


def _url(url: str) -> str:
    if url == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp()}/beat.db"
    return url


async def _cleanup(url: str, namespace: str) -> None:
    if url.startswith(("postgres://", "postgresql://")):
        import asyncpg
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await conn.close()
    elif url.startswith(("redis://", "rediss://")):
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(url)
        try:
            for pattern in (f"{namespace}:*", f"{{{namespace}:*"):
                keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
                if keys:
                    await client.delete(*keys)
        finally:
            await client.aclose()


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


def _pct(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q + 0.5) - 1))]


async def _enqueue_floor(app: stem.Stem, entries: int, rounds: int = 5) -> float:
    """Median time (ms) of one ``enqueue_many`` of ``entries`` tasks on this store: the
    part of each run's drift a beat cannot avoid (its dispatch is that call)."""
    from stem.task import TaskCall

    definition = app.definition("bench.noop")
    times = []
    for _ in range(rounds):
        calls = [TaskCall(definition, {}).with_options(task_id=uuid.uuid4().hex)
                 for _ in range(entries)]
        started = time.perf_counter()
        await app.enqueue_many(calls)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


async def drift(url: str, entries: int, seconds: float, profile: str | None) -> dict[str, Any]:
    url = _url(url)
    namespace = f"bench_beat_{uuid.uuid4().hex[:8]}"
    app = stem.Stem("bench-beat", broker=url, backend=url, namespace=namespace)
    store = store_from_url(url, namespace=namespace)
    try:
        await store.migrate()
        first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        for start in range(0, entries, 50):
            await asyncio.gather(*(store.schedules.upsert(ScheduleEntry(
                id=f"e{i:05d}", task="bench.noop", spec={"kind": "interval", "everyMs": 1000},
                next_run_at=first)) for i in range(start, min(entries, start + 50))))
        floor = await _enqueue_floor(app, entries)
        drifts: list[int] = []
        enqueue: dict[str, int] = {}
        late: dict[str, int] = {}

        by_second: dict[str, int] = {}

        def on_dispatch(sender: Any, **kw: Any) -> None:
            drifts.append(kw["drift_ms"])
            key = kw["scheduled_at"].isoformat(timespec="seconds")
            by_second[key] = max(by_second.get(key, 0), kw["drift_ms"])

        stem.signals.schedule_entry_dispatched.connect(on_dispatch)
        beat = Beat(app, schedules=store.schedules, locks=store.locks,
                    max_interval=float(os.environ.get("BENCH_MAX_INTERVAL", "5")))
        profiler = None
        if profile:
            from pyinstrument import Profiler
            profiler = Profiler(async_mode="disabled")
            profiler.start()
        task = asyncio.create_task(beat.run())
        await asyncio.sleep((first - datetime.now(UTC)).total_seconds() + seconds - 0.5)
        beat.request_stop()
        await task
        if profiler is not None and profile:
            profiler.stop()
            _write(profile, profiler.output_text(show_all=False)
                   if profile.endswith(".txt") else profiler.output_html())
        stem.signals.schedule_entry_dispatched.disconnect(on_dispatch)
        # Split each second's worst drift of a sample of entries into the enqueue call
        # (the run's durationMs) and how late the beat started it.
        for i in range(0, entries, max(entries // 50, 1)):
            for r in await store.schedules.history(f"e{i:05d}", 1000):
                key = r.scheduled_at.isoformat(timespec="seconds")
                ms = round((r.executed_at - r.scheduled_at).total_seconds() * 1000)
                enqueue[key] = max(enqueue.get(key, 0), r.duration_ms)
                late[key] = max(late.get(key, 0), ms - r.duration_ms)
    finally:
        await store.close()
        await app.close()
        await _cleanup(url, namespace)
    return {"url": url.split("://")[0], "entries": entries, "floor_ms": floor,
            "runs": len(drifts),
            "expected": entries * int(seconds),
            "p50_ms": statistics.median(drifts) if drifts else None,
            "p99_ms": _pct(drifts, 0.99), "max_ms": max(drifts) if drifts else None,
            "max_ms_per_second": [by_second[k] for k in sorted(by_second)],
            "enqueue_ms_per_second": [enqueue[k] for k in sorted(enqueue)],
            "start_late_ms_per_second": [late[k] for k in sorted(late)]}


async def record(url: str, entries: int, rounds: int) -> dict[str, Any]:
    url = _url(url)
    namespace = f"bench_beat_{uuid.uuid4().hex[:8]}"
    store = store_from_url(url, namespace=namespace)
    schedules = store.schedules
    batch_ms: list[float] = []
    single_ms: list[float] = []
    limit = asyncio.Semaphore(64)
    try:
        await store.migrate()
        start = datetime.now(UTC).replace(microsecond=0)
        ids = [f"e{i:05d}" for i in range(entries)]
        for first in range(0, entries, 50):
            await asyncio.gather(*(schedules.upsert(ScheduleEntry(
                id=i, task="bench.noop", spec={"kind": "interval", "everyMs": 1000},
                next_run_at=start)) for i in ids[first:first + 50]))
        version = 1

        def runs(n: int) -> list[MarkRun]:
            at = start + timedelta(seconds=n)
            return [MarkRun(ScheduleRun(i, at, at + timedelta(milliseconds=20), True, 20),
                            version, at + timedelta(seconds=1)) for i in ids]

        async def one(m: MarkRun) -> Any:
            async with limit:
                return await schedules.mark_run(m.run, expected_version=m.expected_version,
                                                next_run_at=m.next_run_at)

        for n in range(rounds * 2):
            batch = runs(n)
            started = time.perf_counter()
            if n % 2 == 0:
                done = await schedules.mark_runs(batch)
            else:
                done = await asyncio.gather(*(one(m) for m in batch))
            took = (time.perf_counter() - started) * 1000
            assert all(d is not None for d in done), "a run was not recorded"
            (batch_ms if n % 2 == 0 else single_ms).append(round(took, 1))
            version += 1
    finally:
        await store.close()
        await _cleanup(url, namespace)
    return {"url": url.split("://")[0], "entries": entries, "mark_runs_ms": batch_ms,
            "mark_run_each_ms": single_ms}


def _beat(url: str, namespace: str, lock_ttl: float, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": url,
           "STEM_NAMESPACE": namespace, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "stem_cli", "beat", "--app", "tests.beat.beat_app:app",
         "--schedule-store", url, "--lock-store", url, "--tick", "0.1",
         "--lock-ttl", str(lock_ttl), "--log-format", "json"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


async def failover(url: str, lock_ttl: float, rounds: int) -> dict[str, Any]:
    url = _url(url)
    namespace = f"bench_beat_{uuid.uuid4().hex[:8]}"
    store = store_from_url(url, namespace=namespace)
    logs = Path(tempfile.mkdtemp())
    times: list[float] = []
    beats: list[subprocess.Popen[bytes]] = []
    try:
        await store.migrate()
        await store.schedules.upsert(ScheduleEntry(
            id="tick", task="beat.tick", spec={"kind": "interval", "everyMs": 1000},
            next_run_at=datetime.now(UTC) + timedelta(seconds=1)))
        beats = [_beat(url, namespace, lock_ttl, logs / f"beat-{i}.log") for i in range(2)]
        for n in range(rounds):
            await asyncio.sleep(3)  # both running; the entry dispatching every second
            owner = await store.locks.owner_of(LEADER_KEY)
            pids = {b.pid: b for b in beats if b.poll() is None}
            leader = next((b for pid, b in pids.items() if owner and f"-{pid}-" in owner), None)
            if leader is None:
                raise RuntimeError(f"no live beat holds the lock (owner {owner!r}); "
                                   f"logs in {logs}")
            before = (await store.schedules.get("tick"))
            assert before is not None
            leader.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            leader.wait(10)
            while True:
                now = await store.schedules.get("tick")
                if now is not None and now.total_run_count > before.total_run_count:
                    times.append(time.monotonic() - killed)
                    break
                if time.monotonic() - killed > lock_ttl * 3 + 5:
                    raise RuntimeError(f"no takeover; logs in {logs}")
                await asyncio.sleep(0.01)
            beats.remove(leader)
            if n + 1 < rounds:
                beats.append(_beat(url, namespace, lock_ttl, logs / f"beat-r{n}.log"))
    finally:
        for b in beats:
            if b.poll() is None:
                b.send_signal(signal.SIGTERM)
                b.wait(15)
        await store.close()
        await _cleanup(url, namespace)
    return {"url": url.split("://")[0], "lock_ttl_s": lock_ttl, "rounds": rounds,
            "failover_s": [round(t, 3) for t in times],
            "max_s": round(max(times), 3) if times else None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="memory://bench",
                        help="a store URL, or 'sqlite' for a new temporary file")
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--profile", metavar="HTML", help="write a pyinstrument report")
    parser.add_argument("--failover", action="store_true",
                        help="measure failover time of two stem beat processes instead")
    parser.add_argument("--record", action="store_true",
                        help="time recording N runs: one mark_runs vs N mark_run calls")
    parser.add_argument("--lock-ttl", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.failover:
        print(asyncio.run(failover(args.url, args.lock_ttl, args.rounds)))
    elif args.record:
        print(asyncio.run(record(args.url, args.entries, args.rounds)))
    else:
        print(asyncio.run(drift(args.url, args.entries, args.seconds, args.profile)))
