"""What a chord costs: N no-op members and a callback, against the same N tasks alone.

Usage::

    python -m bench.chord_cost [redis|postgres|sqlite ...] [--url URL] [--n 10000] [-c 100]

One worker process (``stem worker start``, concurrency ``-c``) is started and warmed up
first; then, for each shape, the clock starts right before the enqueue:

- plain: ``enqueue_many`` of N ``bench.noop`` tasks, until the last one completed;
- chord: ``chord([bench.noop] * N, bench.chord_done)``, until the callback started.

The ratio is chord / plain: the price of recording every member in the group store,
the claim, and building and publishing the callback with N results.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import stem
from bench import bench_app
from bench.run import URLS
from stem.log import configure_logging


async def measure(url: str, n: int, concurrency: int) -> dict[str, float]:
    namespace = "chordcost" + uuid.uuid4().hex[:8]
    app = stem.Stem("bench-producer", broker=url, backend=url, namespace=namespace)
    for d in bench_app.app.tasks.values():
        app.register(stem.TaskDefinition(d.name, d.func, options=d.options))
    env = {**os.environ, "STEM_BROKER_URL": url, "STEM_NAMESPACE": namespace}
    env.pop("STEM_RESULT_BACKEND_URL", None)
    env.pop("BENCH_REDIS_URL", None)
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child we stop at the end
        [sys.executable, "-m", "stem_cli", "worker", "start", "--app", "bench.bench_app:app",
         "-c", str(concurrency), "--log-level", "WARNING", "--block-time", "1"], env=env)
    noop = app.tasks["bench.noop"]
    out: dict[str, float] = {}
    try:
        await app.wait(await noop.enqueue(), timeout=60)  # the worker is up
        # Plain: N tasks, from before the enqueue to the last completion.
        t0 = time.time()
        ids: list[str] = []
        for s in range(0, n, 1000):
            ids += await app.enqueue_many([noop.call()] * min(1000, n - s))
        last = 0.0
        for s in range(0, n, 1000):
            for r in await stem.canvas.GroupResult(app, "plain", ids[s:s + 1000]).wait(600):
                last = max(last, float(r.value))
        out["plain"] = last - t0
        # Chord: the same N tasks as members, until the callback started.
        t0 = time.time()
        result = await stem.chord([noop.s()] * n, app.tasks["bench.chord_done"].s()).enqueue()
        out["enqueue_chord"] = time.time() - t0
        callback = await result.callback_result(timeout=600)
        started, members = callback.value
        assert int(members) == n, callback
        out["chord"] = started - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        await app.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chord_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("backends", nargs="*", metavar="BACKEND")
    parser.add_argument("--url")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    urls = [args.url] if args.url else [URLS[b] for b in args.backends or ["redis", "postgres"]]
    configure_logging("WARNING")
    for url in urls:
        fig = asyncio.run(measure(url, args.n, args.concurrency))
        print(f"{url.split(':')[0]:<10} n={args.n}  plain {fig['plain']:.2f} s "
              f"({args.n / fig['plain']:,.0f}/s)  chord {fig['chord']:.2f} s "
              f"(enqueue {fig['enqueue_chord']:.2f} s)  ratio {fig['chord'] / fig['plain']:.2f}")


if __name__ == "__main__":
    main()
