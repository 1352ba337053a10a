"""Beat dispatch drift: N entries due every second, dispatched by one in-process beat.

    python -m bench.beat_drift --url memory://bench --entries 1000 --seconds 10

Prints p50/p99/max of drift (how late each run was enqueued after its scheduled time)
over the runs of the window. Failover time is measured by tests/beat/test_beat_processes.py
(SIGKILL of one beat: the other takes over within the lock TTL).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import stem
from stem.adapters import store_from_url
from stem.beat import Beat, ScheduleEntry


async def main(url: str, entries: int, seconds: float) -> dict[str, Any]:
    broker = f"sqlite:///{tempfile.mkdtemp()}/broker.db" if not url.startswith("memory") \
        else url
    app = stem.Stem("bench-beat", broker=broker, backend=broker)
    store: Any = store_from_url(url)
    first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    for i in range(entries):
        await store.schedules.upsert(ScheduleEntry(
            id=f"e{i:05d}", task="bench.noop", spec={"kind": "interval", "everyMs": 1000},
            next_run_at=first))
    drifts: list[int] = []
    stem.signals.schedule_entry_dispatched.connect(
        lambda sender, **kw: drifts.append(kw["drift_ms"]))
    beat = Beat(app, schedules=store.schedules, locks=store.locks, tick=0.05,
                concurrency=256)
    task = asyncio.create_task(beat.run())
    started = time.monotonic()
    await asyncio.sleep(2 + seconds)
    beat.request_stop()
    await task
    await store.close()
    await app.close()
    drifts.sort()
    return {"url": url.split("://")[0], "entries": entries, "runs": len(drifts),
            "expected": entries * int(seconds), "elapsed": round(time.monotonic() - started, 1),
            "p50_ms": statistics.median(drifts) if drifts else None,
            "p99_ms": drifts[int(len(drifts) * 0.99) - 1] if drifts else None,
            "max_ms": drifts[-1] if drifts else None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="memory://bench")
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(asyncio.run(main(args.url, args.entries, args.seconds)))
