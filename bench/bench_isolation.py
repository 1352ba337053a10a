"""Process-pool overhead: 5,000 trivial tasks with ``isolation="process"`` (pool of 2) vs inline.

Both runs use the in-memory broker and backend and an in-process worker, so the
figure is the cost of isolation itself (IPC, child scheduling), not of a broker.
The pool is started and warmed before timing; each mode runs ``--repeat`` times
and the best and median rates are printed, then the ratio of the medians.

    python -m bench.bench_isolation [--n 5000] [--pool 2] [--concurrency 100] [--repeat 3]

The issue's target: the process path within 3x of inline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import stem
from stem import signals
from stem.log import configure_logging
from stem.worker import Worker

INLINE = "bench_iso.inline"
PROCESS = "bench_iso.process"


async def inline_noop(i: int) -> int:
    return i


def process_noop(i: int) -> int:
    return i


def make_app(url: str) -> stem.Stem:
    """An app with both tasks (explicit names, so the pool's children find them)."""
    app = stem.Stem("bench-iso", broker=url, backend=url)
    app.task(name=INLINE, track_started=False)(inline_noop)
    app.task(name=PROCESS, track_started=False, isolation="process")(process_noop)
    return app


app = make_app("memory://bench-iso")  # what pool children import


def _spec() -> str:
    # `python -m bench.bench_isolation` → "bench.bench_isolation"; run as a file, the
    # script's folder is on sys.path and the module is importable by its file name.
    name = __spec__.name if __spec__ is not None and __spec__.name != "__main__" else (
        Path(__file__).stem)
    return f"{name}:app"


async def _run_once(worker_app: stem.Stem, worker: Worker, task: str, n: int) -> float:
    done = asyncio.Event()
    count = 0

    def on_postrun(sender: Any, **_: Any) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    signals.task_postrun.connect(on_postrun)
    try:
        definition = worker_app.tasks[task]
        calls = [definition.call(i) for i in range(n)]
        t0 = time.perf_counter()
        ids = await worker_app.enqueue_many(calls)
        await done.wait()
        while True:  # until every result is stored, not just computed
            stored = await worker_app.backend.get_many(ids)
            if len(stored) == n and all(s.state.is_terminal for s in stored.values()):
                break
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - t0
    finally:
        signals.task_postrun.disconnect(on_postrun)
    bad = [s for s in stored.values() if s.state is not stem.TaskState.SUCCEEDED]
    if bad:
        raise RuntimeError(f"{len(bad)} tasks did not succeed: {bad[0]}")
    return n / elapsed


async def measure(task: str, *, n: int, repeat: int, concurrency: int, pool: int) -> list[float]:
    """Tasks/s of ``repeat`` runs of ``n`` tasks (after a warm-up run)."""
    worker_app = make_app(f"memory://bench-iso-{uuid.uuid4().hex[:8]}")
    worker = Worker(worker_app, concurrency=concurrency, block_time=0.1,
                    pool_size=pool, app_spec=_spec())
    runner = asyncio.create_task(worker.run())
    try:
        while worker.executor.process_pool is None or \
                worker.executor.process_pool.ready_count < pool:
            if runner.done():
                runner.result()
            await asyncio.sleep(0.01)
        await _run_once(worker_app, worker, task, min(n, 500))  # warm-up
        return [await _run_once(worker_app, worker, task, n) for _ in range(repeat)]
    finally:
        worker.request_stop()
        await runner


def main() -> None:
    """Parse arguments, measure both modes, print the rates and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("WARNING")

    async def run() -> None:
        kw = {"n": args.n, "repeat": args.repeat, "concurrency": args.concurrency,
              "pool": args.pool}
        inline = await measure(INLINE, **kw)
        process = await measure(PROCESS, **kw)
        print(f"{args.n} trivial tasks, concurrency {args.concurrency}, memory broker")
        for label, rates in (("inline", inline), (f"process (pool {args.pool})", process)):
            print(f"  {label:<18} median {statistics.median(rates):>8.0f} tasks/s   "
                  f"best {max(rates):>8.0f}   runs {[round(r) for r in rates]}")
        ratio = statistics.median(inline) / statistics.median(process)
        print(f"  inline / process   {ratio:.2f}x  (target: within 3x)")

    asyncio.run(run())


if __name__ == "__main__":
    main()
