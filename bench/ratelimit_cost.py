"""What a rate limit costs when it does not bind: W2 (drain a backlog with one worker
process) of ``bench.noop`` against ``bench.noop_limited`` (``rate_limit="100000/s"``),
on the same server in the same run, alternating so drift hits both alike.

    python -m bench.ratelimit_cost --url redis://127.0.0.1:6379/2 -n 10000 --rounds 3

Each limited task costs one limiter call (a Lua script on Redis, a statement on
Postgres) before it starts; the ratio is the drain rate limited / unlimited.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.workloads import Bench


async def drain(bench: Bench, task: str) -> float:
    """Tasks per second from first to last completion of an ``n``-task backlog."""
    call = bench.app.definition(task).call()
    ids: list[str] = []
    for s in range(0, bench.n, 1000):
        ids += await bench.app.enqueue_many([call] * min(1000, bench.n - s))
    proc = bench._worker(bench.concurrency)
    try:
        done = await bench._drained(ids, timeout=300)
    finally:
        bench._stop(proc)
    if len(done) < len(ids):
        print(f"  {task}: only {len(done)}/{len(ids)} finished")
    ts = sorted(float(v) for v in done.values())
    return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/2")
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench = Bench(args.url, n=args.n, redis_counter_url=None)
    plain: list[float] = []
    limited: list[float] = []
    try:
        for r in range(args.rounds):
            t = time.perf_counter()
            plain.append(await drain(bench, "bench.noop"))
            limited.append(await drain(bench, "bench.noop_limited"))
            print(f"round {r + 1}: unlimited {plain[-1]:,.0f}/s, "
                  f"limited {limited[-1]:,.0f}/s ({time.perf_counter() - t:.1f} s)")
    finally:
        await bench.app.broker.purge("default")
        await bench.app.close()
    p, q = statistics.median(plain), statistics.median(limited)
    print(f"median: unlimited {p:,.0f}/s, rate_limit='100000/s' {q:,.0f}/s, "
          f"ratio {q / p:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
