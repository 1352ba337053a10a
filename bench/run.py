"""`make bench`: workloads W0-W4 on Redis and Postgres, next to the raw floors of the same run.

Usage::

    python -m bench.run [redis|postgres|sqlite ...] [--url URL] [--floor-dir DIR]
                        [--n N] [-w W1 ...] [-c CONCURRENCY] [--counter-redis URL]

``--floor-dir`` names the folder with the raw floor scripts (``floor_redis.py``,
``floor_postgres.py``); without it the floors are left out of the table. Not part of
the installed package: run it from a checkout.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.console import Console

from bench import workloads
from stem._urls import mask_url
from stem.log import configure_logging

URLS = {
    "redis": "redis://127.0.0.1:6379/14",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test?schema=stem_bench",
    "sqlite": "sqlite:///.stem/bench.db",
}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark for each named backend (default: redis and postgres) or --url."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("backends", nargs="*", metavar="BACKEND",
                        help="redis, postgres or sqlite (default: redis postgres)")
    parser.add_argument("--url", help="a broker (and result backend) URL instead")
    parser.add_argument("--floor-dir", type=Path, help="folder with the raw floor scripts")
    parser.add_argument("--n", type=int, default=10_000, help="tasks for W1/W2")
    parser.add_argument("-w", "--workload", action="append", help="W0..W4 (default all)")
    parser.add_argument("-c", "--concurrency", type=int, default=100)
    parser.add_argument("--counter-redis", default=None,
                        help="Redis for the per-task INCR of W2 (peers' parity); '' for none "
                             "(default: the Redis being measured, else the local default one)")
    parser.add_argument("--yes", action="store_true",
                        help="allow a server that is not on this machine (the benchmark "
                             "writes, times and deletes its own keys/rows there)")
    parser.add_argument("--signing", choices=["none", "hmac", "ed25519"], default="none",
                        help="sign every envelope (fresh random keys; the worker verifies)")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends if b not in URLS]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r}; use {', '.join(URLS)} or --url")
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and -c must be positive")
    urls = [args.url] if args.url else [URLS[b] for b in args.backends or ["redis", "postgres"]]
    wl = {w.upper() for w in (args.workload or ["W0", "W1", "W2", "W3", "W4"])}
    for url in [*urls, args.counter_redis or ""]:
        if url and not args.yes and not workloads.is_local(url):
            parser.error(f"{mask_url(url)} is not on this machine; the benchmark only touches "
                         "its own keys and rows, but pass --yes to run it against a shared "
                         "server")
    configure_logging("WARNING")
    for url in urls:
        counter = args.counter_redis
        if counter is None:  # the Redis being measured, else the local default one
            kind = workloads._kind(url)
            counter = url if kind == "redis" else (URLS["redis"] if not args.url else None)
        fig = asyncio.run(workloads.run(url, n=args.n, workloads=wl, floor_dir=args.floor_dir,
                                        redis_counter_url=counter or None,
                                        concurrency=args.concurrency,
                                        signing=args.signing))
        workloads.report(workloads._kind(url), fig, Console())


if __name__ == "__main__":
    main()
