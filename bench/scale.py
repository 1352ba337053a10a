"""Scale and cost growth: bigger backlogs, more workers, a burst coming due, memory.

Usage::

    python -m bench.scale [redis|postgres ...] [--url URL] [--scale F] [--yes]
                          [-c CONCURRENCY] [--phase plan|due|rss ...]

Phases (sizes times ``--scale``), each one row of the table:

- plan: drain 10k, drain 100k, drain 20k with 2 workers, drain 20k with 1, in that
  order (the sequence of the Postgres plan-stability issue). Each drain enqueues its
  backlog, then starts the worker(s); the rate runs from first to last completion,
  the wall time from starting the workers to the last completion; the workers idle
  3 s before they are stopped. On Postgres also the rate of each half of the drain
  (a slow first half is a bad plan that statistics only fixed later), and the jobs
  table's planner row count (``reltuples``), live and dead rows, size (heap alone,
  and with its indexes and TOAST) and the vacuums and analyzes it had so far, after
  the phase. The Postgres sequence starts from the
  state a previous run leaves: the jobs table's ``reltuples`` is 0 (see
  :func:`stale_stats`).
- due: 50k tasks with the same ``eta`` a few seconds ahead, enqueued while one worker
  runs; time from the due moment to the last handler start, how many started before
  their due time (must be none) and how many never ran (must be none).
- rss: one worker drains a 200k backlog; its ``VmRSS`` after the first 10k (warm-up)
  and at the end, and the growth.

What it touches: only the URL's database. On Redis, keys under a fresh random
namespace (deleted afterwards). On Postgres, a fresh schema named after that
namespace when the URL names none (dropped afterwards); with ``?schema=`` it uses
that schema's ``default`` queue and its jobs table (the "stale statistics" start is
then only set up if the table is empty). A server not on this machine is refused
unless ``--yes``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from rich.console import Console
from rich.table import Table

from bench.run import URLS
from bench.workloads import Bench, _kind, is_local
from stem._urls import mask_url
from stem.log import configure_logging

#: Seconds the workers idle after a drain before they are stopped (> their 1 s block).
SETTLE = 3.0


def default_url(backend: str) -> str:
    """The backend's URL of ``bench.run``; for Postgres without ``?schema=``, so the run
    gets a schema of its own (named after its random namespace)."""
    url = URLS[backend]
    if backend != "postgres":
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class Row:
    """One phase's figures (None: not measured / not applicable)."""

    phase: str
    tasks: int
    workers: int
    rate: float | None = None
    wall: float | None = None
    first_half: float | None = None
    second_half: float | None = None
    table: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def half_rates(ts: list[float]) -> tuple[float | None, float | None]:
    """Tasks per second over the first and the second half of sorted completion times."""
    n = len(ts)
    if n < 4:
        return None, None
    mid = n // 2
    a = (mid - 1) / (ts[mid - 1] - ts[0]) if ts[mid - 1] > ts[0] else None
    b = (n - mid - 1) / (ts[-1] - ts[mid]) if ts[-1] > ts[mid] else None
    return a, b


def rss_kib(pid: int) -> int:
    """The process's resident set (``VmRSS``) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Scale(Bench):
    """The scale phases against one URL (broker and result backend on the same store)."""

    def __init__(self, url: str, *, scale: float, concurrency: int) -> None:
        # No per-task INCR: these figures are the framework's and the store's alone.
        super().__init__(url, n=0, redis_counter_url=None, concurrency=concurrency)
        self.scale = scale
        self.kind = _kind(url)
        self.own_schema = False
        self.pg: Any = None
        if self.kind == "postgres":
            from stem.adapters.postgres._pool import parse_url

            settings = parse_url(url, self.namespace)
            self.dsn = settings.dsn
            self.schema = settings.schema
            self.own_schema = "schema" not in dict(parse_qsl(urlsplit(url).query))
            self.jobs = f'"{self.schema}".stem_jobs'

    def size(self, n: int) -> int:
        return max(10, int(n * self.scale))

    # -- Postgres helpers ------------------------------------------------------------

    async def connect(self) -> None:
        await self.app.broker.ping()  # creates (migrates) the schema
        if self.kind == "postgres":
            import asyncpg

            self.pg = await asyncpg.connect(self.dsn)

    async def table_stats(self) -> dict[str, float]:
        """The jobs table's planner row count, live/dead rows and size (with the
        statistics the stopped workers flushed on exit)."""
        if self.pg is None:
            return {}
        await asyncio.sleep(1.0)  # a backend's counters reach the views within ~1 s
        await self.pg.execute("SELECT pg_stat_clear_snapshot()")
        row = await self.pg.fetchrow(f"""
            SELECT c.reltuples, c.relpages, s.n_live_tup, s.n_dead_tup,
                   pg_relation_size(c.oid) AS heap, pg_total_relation_size(c.oid) AS size,
                   s.vacuum_count + s.autovacuum_count AS vacuums,
                   s.analyze_count + s.autoanalyze_count AS analyzes
            FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
            WHERE c.oid = '{self.jobs}'::regclass""")
        return {k: float(row[k]) for k in row.keys()}

    async def stale_stats(self) -> str:
        """Leave the jobs table as a previous run does: its rows gone but its pages
        still there, and ``reltuples`` 0.

        A drain deletes every row it acks; the last ANALYZE (the broker's own, or the
        churn ``VACUUM (ANALYZE)``, or autovacuum's) then sees no live row and records
        ``reltuples = 0`` over the table's pages, so the planner estimates ~0 rows for
        whatever backlog arrives next, until statistics are refreshed. Here: publish
        2,000 jobs, delete them (DELETE leaves the pages, as acks do) and ANALYZE.
        """
        assert self.pg is not None
        if not self.own_schema and await self.pg.fetchval(
                f"SELECT count(*) FROM {self.jobs}"):
            return "stale start skipped: the given schema's jobs table has rows"
        call = self.app.definition("bench.noop").call()
        await self.app.enqueue_many([call] * 2000)
        await self.app.broker.purge("default")
        await self.pg.execute(f"ANALYZE {self.jobs}")
        st = await self.pg.fetchrow(
            f"SELECT reltuples, relpages FROM pg_class WHERE oid = '{self.jobs}'::regclass")
        return f"start: reltuples {st[0]:.0f} over {st[1]} pages"

    async def close(self) -> None:
        try:
            await self.app.broker.purge("default")
        finally:
            await self.app.close()
            if self.pg is not None:
                if self.own_schema:
                    await self.pg.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                await self.pg.close()
            await self.cleanup()

    # -- phases ------------------------------------------------------------------------

    async def enqueue(self, name: str, n: int, **options: Any) -> list[str]:
        call = self.app.definition(name).call()
        if options:
            call = call.with_options(**options)
        ids: list[str] = []
        for s in range(0, n, 1000):
            ids += await self.app.enqueue_many([call] * min(1000, n - s))
        return ids

    async def drain(self, label: str, n: int, workers: int) -> Row:
        """Enqueue an ``n`` backlog of no-ops, then drain it with ``workers`` processes."""
        ids = await self.enqueue("bench.noop", n)
        t0 = time.time()
        procs = [self._worker(self.concurrency) for _ in range(workers)]
        try:
            done = await self._drained(ids, timeout=600)
            # Let the workers idle a moment before stopping them, as a drained queue's
            # workers do: what the table looks like then includes their upkeep.
            await asyncio.sleep(SETTLE)
        finally:
            for p in procs:
                self._stop(p)
        row = Row(label, n, workers)
        ts = sorted(float(v) for v in done.values())
        if len(ts) < n:
            row.notes.append(f"only {len(ts)}/{n} finished")
        if len(ts) > 1:
            row.rate = (len(ts) - 1) / (ts[-1] - ts[0])
            row.wall = ts[-1] - t0
            row.first_half, row.second_half = half_rates(ts)
        row.table = await self.table_stats()
        return row

    async def due(self, n: int, lead: float) -> Row:
        """``n`` tasks due at one moment ``lead`` seconds after their enqueue starts."""
        proc = self._worker(self.concurrency)
        row = Row("due at one moment", n, 1)
        try:
            start = self.app.definition("bench.start")
            await self.app.wait(await start.enqueue(), timeout=60)  # the worker is up
            due_at = time.time() + lead
            eta = datetime.fromtimestamp(due_at, UTC)
            ids = await self.enqueue("bench.start", n, eta=eta)
            enqueued = time.time()
            if enqueued >= due_at:
                row.notes.append(f"enqueue ran {enqueued - due_at:.1f} s past the due time")
            await asyncio.sleep(max(0.0, due_at - time.time()))
            done = await self._drained(ids, timeout=600)
        finally:
            self._stop(proc)
        starts = sorted(float(v) for v in done.values())
        early = sum(1 for s in starts if s < due_at)
        row.notes.append(f"enqueued {enqueued - (due_at - lead):.1f} s, due +{lead:.0f} s")
        row.notes.append(f"early {early}, lost {n - len(starts)}")
        if starts:
            row.wall = starts[-1] - due_at
            row.rate = len(starts) / row.wall if row.wall > 0 else None
            row.notes.append(f"first start +{(starts[0] - due_at) * 1000:.0f} ms")
        row.table = await self.table_stats()
        return row

    async def rss(self, n: int, warm: int) -> Row:
        """One worker drains an ``n`` backlog; its VmRSS after ``warm`` tasks and at the end."""
        ids = await self.enqueue("bench.noop", n)
        t0 = time.time()
        proc = self._worker(self.concurrency)
        row = Row("RSS over a drain", n, 1)
        samples: list[tuple[int, int]] = []  # (tasks done, KiB)
        try:
            next_sample = warm
            while True:
                stats = await self.app.broker.stats("default")
                left = stats.pending + stats.in_flight + stats.delayed
                finished = n - left
                if finished >= next_sample or left == 0:
                    if left == 0:
                        # Settled: the completer's last acks are in, the worker idles.
                        await asyncio.sleep(1.0)
                    samples.append((finished, rss_kib(proc.pid)))
                    next_sample = max(next_sample, finished) + max(warm, n // 10)
                if left == 0 or time.time() - t0 > 900:
                    break
                await asyncio.sleep(0.5)
            done = await self._drained(ids, timeout=60)
        finally:
            self._stop(proc)
        ts = sorted(float(v) for v in done.values())
        if len(ts) > 1:
            row.rate = (len(ts) - 1) / (ts[-1] - ts[0])
            row.wall = ts[-1] - t0
        if len(ts) < n:
            row.notes.append(f"only {len(ts)}/{n} finished")
        first, last = samples[0], samples[-1]
        row.notes.append(f"RSS {first[1] / 1024:.1f} MiB after {first[0]:,}, "
                         f"{last[1] / 1024:.1f} MiB after {last[0]:,}: "
                         f"{(last[1] - first[1]) / 1024:+.2f} MiB")
        row.notes.append("samples MiB " + " ".join(f"{k / 1024:.1f}" for _, k in samples))
        row.table = await self.table_stats()
        return row


async def run(url: str, *, scale: float, concurrency: int, phases: set[str],
              console: Console) -> list[Row]:
    """Run the selected phases against ``url``; print each row as it comes."""
    s = Scale(url, scale=scale, concurrency=concurrency)
    rows: list[Row] = []

    def done(row: Row) -> None:
        rows.append(row)
        console.print(f"  {row.phase}: " + _line(row))

    try:
        await s.connect()
        await s.app.broker.purge("default")
        if "plan" in phases:
            if s.kind == "postgres":
                note = await s.stale_stats()
                before = Row("start (stale statistics)", 0, 0, table=await s.table_stats(),
                             notes=[note])
                done(before)
            for label, n, workers in (("drain 10k", 10_000, 1), ("drain 100k", 100_000, 1),
                                      ("drain 20k, 2 workers", 20_000, 2),
                                      ("drain 20k, 1 worker", 20_000, 1)):
                done(await s.drain(label, s.size(n), workers))
        if "due" in phases:
            n = s.size(50_000)
            # Enough lead for the enqueue (~10k/s at least) to end before the due time.
            done(await s.due(n, lead=3.0 + n / 10_000))
        if "rss" in phases:
            done(await s.rss(s.size(200_000), s.size(10_000)))
    finally:
        await s.close()
    return rows


def _line(r: Row) -> str:
    parts = [f"{r.tasks:,} tasks"]
    if r.rate:
        parts.append(f"{r.rate:,.0f}/s")
    if r.wall is not None:
        parts.append(f"{r.wall:.2f} s")
    if r.first_half and r.second_half:
        parts.append(f"halves {r.first_half:,.0f}/s {r.second_half:,.0f}/s")
    return ", ".join(parts + r.notes)


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def report(kind: str, rows: list[Row], console: Console, scale: float) -> None:
    """The rows as a table."""
    pg = kind == "postgres"
    cols = ["phase", "tasks", "workers", "rate /s", "wall s"]
    if pg:
        cols += ["1st half /s", "2nd half /s", "reltuples", "live", "dead", "heap MiB",
                 "total MiB", "vac/an"]
    title = f"make bench-scale — {kind}" + (f" (scale {scale:g})" if scale != 1 else "")
    t = Table(*cols, title=title)
    for r in rows:
        cells = [r.phase, f"{r.tasks:,}", str(r.workers or "-"),
                 f"{r.rate:,.0f}" if r.rate else "-",
                 f"{r.wall:.2f}" if r.wall is not None else "-"]
        if pg:
            tb = r.table
            cells += [f"{r.first_half:,.0f}" if r.first_half else "-",
                      f"{r.second_half:,.0f}" if r.second_half else "-"]
            if tb:
                cells += [f"{tb['reltuples']:,.0f}", f"{tb['n_live_tup']:,.0f}",
                          f"{tb['n_dead_tup']:,.0f}", _mib(tb["heap"]), _mib(tb["size"]),
                          f"{tb['vacuums']:.0f}/{tb['analyzes']:.0f}"]
            else:
                cells += ["-"] * 6
        t.add_row(*cells)
    console.print(t)
    for r in rows:
        if r.notes:
            console.print(f"{r.phase}: " + "; ".join(r.notes))


def main(argv: list[str] | None = None) -> None:
    """Run the scale phases for each named backend (default: redis and postgres) or --url."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("backends", nargs="*", metavar="BACKEND",
                        help="redis or postgres (default: both)")
    parser.add_argument("--url", help="a broker (and result backend) URL instead")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every size (e.g. 0.1 for a quick check)")
    parser.add_argument("-c", "--concurrency", type=int, default=100)
    parser.add_argument("--phase", action="append", choices=["plan", "due", "rss"],
                        help="run only these phases (default: all)")
    parser.add_argument("--yes", action="store_true",
                        help="allow a server that is not on this machine (the benchmark "
                             "writes, times and deletes its own keys/rows there)")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends if b not in ("redis", "postgres")]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r}; use redis, postgres or --url")
    if not args.scale > 0 or args.concurrency < 1:
        parser.error("--scale and -c must be positive")
    urls = [args.url] if args.url else [default_url(b) for b in args.backends
                                        or ["redis", "postgres"]]
    for url in urls:
        if _kind(url) not in ("redis", "postgres"):
            parser.error(f"{mask_url(url)}: only Redis and Postgres are measured here")
        if not args.yes and not is_local(url):
            parser.error(f"{mask_url(url)} is not on this machine; the benchmark only touches "
                         "its own keys and rows, but pass --yes to run it against a shared "
                         "server")
    configure_logging("WARNING")
    console = Console(width=max(Console().width, 150))
    phases = set(args.phase or ["plan", "due", "rss"])
    for url in urls:
        console.print(f"[bold]{_kind(url)}[/bold] {mask_url(url)}")
        rows = asyncio.run(run(url, scale=args.scale, concurrency=args.concurrency,
                               phases=phases, console=console))
        report(_kind(url), rows, console, args.scale)


if __name__ == "__main__":
    main()

