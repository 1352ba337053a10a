"""``stem observe``: queues, workers, schedules, dead letters and metrics at a glance.

Every command prints a rich table (never truncated when piped), ``--json`` prints the
same data as JSON, and ``--watch`` refreshes it in place every ``--interval`` seconds
(with ``--json``: one JSON document per refresh, one per line) until Ctrl-C or
``--count`` refreshes.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, TypeVar

import orjson
import typer

from stem.app import Stem
from stem.config import StemConfig
from stem.ports import DeadLetter, QueueStats
from stem_cli._app import between, fail, load_app
from stem_cli.ops import AppOpt, QueueOpt, _letter_json, _queues, _when

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from stem.beat.entry import ScheduleEntry

T = TypeVar("T")

observe_app = typer.Typer(help="Look at queues, workers, schedules, dead letters and metrics "
                               "(tables, --json, --watch).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
WatchOpt = Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place every "
                                        "--interval seconds until Ctrl-C.")]
IntervalOpt = Annotated[float, typer.Option("--interval", callback=between(0.1, 3600, " seconds"),
                        help="Seconds between two refreshes with --watch.")]
CountOpt = Annotated[int | None, typer.Option("--count", callback=between(1, 10**9),
                     help="With --watch: stop after this many refreshes.")]

#: ``observe schedules``: an entry this late (seconds past its next run) counts as overdue:
#: beat looks every second, so it means no beat is dispatching it.
OVERDUE_AFTER = 30.0
#: What ``observe workers`` shows, and where it comes from.
NO_HEARTBEATS = ("workers from their heartbeats in the result backend (stale: none for two "
                 "intervals; `stem worker status`), leases in flight per queue from the "
                 "broker and, with --pid-dir, the local nodes of `stem worker multi`")


def _console() -> Console:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=100_000, soft_wrap=True)


@dataclass(slots=True)
class _View(Generic[T]):
    """One observe command: how to read a snapshot, close what it opened, draw it and
    turn it into JSON lines (usually one)."""

    fetch: Callable[[], Awaitable[T]]
    close: Callable[[], Awaitable[None]]
    render: Callable[[T], RenderableType]
    to_json: Callable[[T], list[Any]]


def _show(view: _View[T], json_out: bool, watch: bool, interval: float, count: int | None
          ) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    async def go() -> None:
        try:
            if not watch:
                _emit(view, await view.fetch(), json_out)
                return
            shown = 0
            if json_out:
                while True:
                    _emit(view, await view.fetch(), True)
                    shown += 1
                    if count is not None and shown >= count:
                        return
                    await asyncio.sleep(interval)
            console = _console()
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    data = await view.fetch()
                    stamp = datetime.now(UTC).strftime("%H:%M:%S")
                    live.update(Group(view.render(data), Text(
                        f"{stamp} UTC · every {interval:g}s · Ctrl-C to stop", style="dim")),
                        refresh=True)
                    shown += 1
                    if count is not None and shown >= count:
                        return
                    await asyncio.sleep(interval)
        finally:
            await view.close()

    try:
        asyncio.run(go())  # a StemError becomes one line in stem_cli.main.run
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _emit(view: _View[T], data: T, json_out: bool) -> None:
    if json_out:
        for item in view.to_json(data):
            typer.echo(orjson.dumps(item).decode())
    else:
        _console().print(view.render(data))


def _app_view(app_spec: str | None, fetch: Callable[[Stem], Awaitable[T]],
              render: Callable[[T], RenderableType], to_json: Callable[[T], list[Any]]
              ) -> _View[T]:
    stem_app = load_app(app_spec) if app_spec else Stem.from_env()
    return _View(lambda: fetch(stem_app), stem_app.close, render, to_json)


# -- queues ------------------------------------------------------------------------------

def queue_json(s: QueueStats) -> dict[str, Any]:
    return {"queue": s.queue, "pending": s.pending, "delayed": s.delayed,
            "inFlight": s.in_flight, "dead": s.dead}


@observe_app.command("queues")
def observe_queues(app_spec: AppOpt = None, queue: QueueOpt = None, json_out: JsonOpt = False,
                   watch: WatchOpt = False, interval: IntervalOpt = 2.0,
                   count: CountOpt = None) -> None:
    """Ready, delayed, in-flight and dead counts per queue (``--json``: one object a line)."""
    from rich.table import Table

    async def fetch(a: Stem) -> list[QueueStats]:
        return [await a.broker.stats(q) for q in _queues(a, queue)]

    def render(stats: list[QueueStats]) -> RenderableType:
        table = Table("queue", "ready", "delayed", "in flight", "dead", title="queues")
        for s in stats:
            table.add_row(s.queue, str(s.pending), str(s.delayed), str(s.in_flight), str(s.dead))
        return table

    _show(_app_view(app_spec, fetch, render, lambda stats: [queue_json(s) for s in stats]),
          json_out, watch, interval, count)


# -- workers -----------------------------------------------------------------------------

@observe_app.command("workers")
def observe_workers(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    pid_dir: Annotated[Path | None, typer.Option(
        "--pid-dir", help="Also show the nodes whose pid files are in this directory "
                          "(`stem worker multi --dir`).")] = None,
    json_out: JsonOpt = False, watch: WatchOpt = False, interval: IntervalOpt = 2.0,
    count: CountOpt = None,
) -> None:
    """What is known about running workers: their heartbeats, leases in flight per queue
    and local nodes.

    The workers with a heartbeat in the result backend (stale ones marked, as `stem
    worker status` shows them), what the broker knows (how many deliveries are leased,
    i.e. being worked on, per queue) and, with ``--pid-dir``, each local node's pid and
    uptime. ``--json``: one object.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from stem.control import ControlClient
    from stem_cli.multi import node_health

    async def fetch(a: Stem) -> dict[str, Any]:
        stats = [await a.broker.stats(q) for q in _queues(a, queue)]
        nodes = [node_health(p) for p in sorted(pid_dir.glob("*.pid"))] if pid_dir else []
        try:
            beats = [{**h.data, "ageMs": round(h.age * 1000), "stale": h.stale}
                     for h in await ControlClient(a).workers()]
        except Exception:  # a backend without heartbeats: the broker's view alone
            beats = []
        return {"source": "broker", "note": NO_HEARTBEATS, "nodes": nodes, "workers": beats,
                "queues": [{"queue": s.queue, "inFlight": s.in_flight, "pending": s.pending}
                           for s in stats]}

    def render(data: dict[str, Any]) -> RenderableType:
        parts: list[RenderableType] = []
        if data["workers"]:
            live = Table("worker", "state", "last seen", "in flight", "processed", "queues",
                         title="workers")
            for w in data["workers"]:
                live.add_row(str(w.get("workerId")), "STALE" if w["stale"] else "live",
                             f"{w['ageMs'] / 1000:.0f}s ago", str(w.get("inflight", "")),
                             str(w.get("processed", "")), ", ".join(w.get("queues", [])))
            parts.append(live)
        if data["nodes"]:
            nodes = Table("node", "status", "pid", "up", "pid file", title="local nodes")
            for n in data["nodes"]:
                up = n.get("uptimeSeconds")
                nodes.add_row(n["node"], "running" if n["status"] == "ok" else n["error"],
                              str(n.get("pid") or "-"), "-" if up is None else f"{up:.0f}s",
                              n["pidfile"])
            parts.append(nodes)
        table = Table("queue", "leased (in flight)", "waiting", title="work in progress")
        for q in data["queues"]:
            table.add_row(q["queue"], str(q["inFlight"]), str(q["pending"]))
        parts += [table, Text(data["note"], style="dim")]
        return Group(*parts)

    _show(_app_view(app_spec, fetch, render, lambda d: [d]), json_out, watch, interval, count)


# -- schedules ---------------------------------------------------------------------------

def schedules_summary(entries: list[ScheduleEntry], now: datetime) -> dict[str, Any]:
    """``due`` (enabled, next run now or past), ``overdue`` (past by more than
    :data:`OVERDUE_AFTER`), and the largest drift beat recorded, in milliseconds."""
    late = [(now - e.next_run_at).total_seconds() for e in entries
            if e.enabled and e.next_run_at is not None and e.next_run_at <= now]
    drifts = [abs(e.drift_ms) for e in entries if e.drift_ms is not None]
    return {"entries": len(entries), "enabled": sum(e.enabled for e in entries),
            "due": len(late), "overdue": sum(s > OVERDUE_AFTER for s in late),
            "maxDriftMs": max(drifts) if drifts else None}


@observe_app.command("schedules")
def observe_schedules(
    schedule_store: Annotated[str | None, typer.Option(
        "--schedule-store", help="Schedule store URL, file:// path or .json/.yaml file "
        "(default: as `stem schedule list`).")] = None,
    json_out: JsonOpt = False, watch: WatchOpt = False, interval: IntervalOpt = 2.0,
    count: CountOpt = None,
) -> None:
    """Schedule entries: a due/overdue summary, then runs, last error and next run of each.

    ``--json``: one object, ``{"summary": {...}, "entries": [...]}``.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from stem.beat.stores import open_beat_stores

    stores = open_beat_stores(schedule_store, namespace=StemConfig.from_env().namespace,
                              want_locks=False)

    async def fetch() -> tuple[list[ScheduleEntry], dict[str, Any]]:
        entries = await stores.schedules.entries()
        return entries, schedules_summary(entries, datetime.now(UTC))

    def render(data: tuple[list[ScheduleEntry], dict[str, Any]]) -> RenderableType:
        entries, s = data
        drift = "-" if s["maxDriftMs"] is None else f"{s['maxDriftMs']}ms"
        line = Text(f"Summary: due={s['due']} overdue={s['overdue']} entries={s['entries']} "
                    f"enabled={s['enabled']} max drift={drift}")
        table = Table("id", "task", "enabled", "next run (UTC)", "last run (UTC)", "runs",
                      "drift", "last error", title="schedules")
        for e in entries:
            table.add_row(e.id, e.task, "yes" if e.enabled else "no", _dt(e.next_run_at),
                          _dt(e.last_run_at), str(e.total_run_count),
                          "-" if e.drift_ms is None else f"{e.drift_ms}ms", e.last_error or "")
        return Group(line, table)

    _show(_View(fetch, stores.close, render,
                lambda d: [{"summary": d[1], "entries": [e.to_dict() for e in d[0]]}]),
          json_out, watch, interval, count)


def _dt(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- dead letters ------------------------------------------------------------------------

@observe_app.command("dlq")
def observe_dlq(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-l", callback=between(1, 10_000),
                     help="Show at most this many dead letters per queue.")] = 20,
    json_out: JsonOpt = False, watch: WatchOpt = False, interval: IntervalOpt = 2.0,
    count: CountOpt = None,
) -> None:
    """Dead letters per queue (how many) and the first ``--limit`` of each: task id, task,
    reason. ``--json``: one object, ``{"queues": {name: count}, "letters": [...]}``."""
    from rich.console import Group
    from rich.table import Table

    async def fetch(a: Stem) -> tuple[dict[str, int], list[DeadLetter]]:
        counts: dict[str, int] = {}
        letters: list[DeadLetter] = []
        for q in _queues(a, queue):
            counts[q] = (await a.broker.stats(q)).dead
            if counts[q]:
                letters += await a.broker.dead_letters(q, limit)
        return counts, letters

    def render(data: tuple[dict[str, int], list[DeadLetter]]) -> RenderableType:
        counts, letters = data
        totals = Table("queue", "dead letters", title="dead letters per queue")
        for q, n in counts.items():
            totals.add_row(q, str(n))
        table = Table("queue", "task id", "task", "dead at (UTC)", "reason", title="dead letters")
        for d in letters:
            table.add_row(d.queue, d.id, d.envelope.name if d.envelope else "(undecodable)",
                          _when(d.dead_at), d.reason)
        return Group(totals, table)

    def to_json(data: tuple[dict[str, int], list[DeadLetter]]) -> list[Any]:
        letters = [{k: v for k, v in _letter_json(d).items() if k != "raw"} for d in data[1]]
        return [{"queues": data[0], "letters": letters}]

    _show(_app_view(app_spec, fetch, render, to_json), json_out, watch, interval, count)


# -- metrics -----------------------------------------------------------------------------

_SAMPLE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[dict[str, Any]]:
    """Samples of a Prometheus text exposition: ``{"name", "labels", "value"}`` each
    (comments and malformed lines skipped)."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(match.group(2) or "")}
        out.append({"name": match.group(1), "labels": labels, "value": value})
    return out


def app_metrics(stem_app: Stem, stats: list[QueueStats]) -> list[dict[str, Any]]:
    """The app's own counters (``app.stats``: this process's producers only) and the
    queue gauges the broker reports, as metric samples named as the exporter names them."""
    out: list[dict[str, Any]] = []
    for attr in getattr(type(stem_app.stats), "__slots__", ()):
        counter = getattr(stem_app.stats, attr, None)
        if isinstance(counter, Counter):
            out += [{"name": f"stem_tasks_{attr}_total", "labels": {"task": task},
                     "value": float(n)} for task, n in sorted(counter.items())]
    for s in stats:
        for name, value in (("stem_queue_depth", s.pending), ("stem_queue_delayed", s.delayed),
                            ("stem_queue_in_flight", s.in_flight),
                            ("stem_queue_dead_letters", s.dead)):
            out.append({"name": name, "labels": {"queue": s.queue}, "value": float(value)})
    return out


@observe_app.command("metrics")
def observe_metrics(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="Scrape this Prometheus endpoint (e.g. a worker's "
                      "http://host:9808/metrics) instead of asking the app.")] = None,
    match: Annotated[str | None, typer.Option(
        "--match", "-m", help="Only metrics whose name contains this text.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", callback=between(0.1, 300, " seconds"),
                       help="Seconds to wait for --url.")] = 10.0,
    json_out: JsonOpt = False, watch: WatchOpt = False, interval: IntervalOpt = 2.0,
    count: CountOpt = None,
) -> None:
    """Metric samples: a ``--url`` endpoint's, else the app's counters and queue gauges.

    ``--json``: one list of ``{"name", "labels", "value"}`` objects.
    """
    import urllib.request

    from rich.table import Table

    if url is not None and not url.startswith(("http://", "https://")):
        raise fail(f"--url {url!r} is not an http:// or https:// address")

    def scrape() -> list[dict[str, Any]]:
        assert url is not None
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return parse_prometheus(resp.read().decode("utf-8", "replace"))
        except OSError as exc:
            raise fail(f"scraping {url}: {exc}", 1) from None

    def keep(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in samples if match is None or match in s["name"]]

    def render(samples: list[dict[str, Any]]) -> RenderableType:
        table = Table("metric", "labels", "value", title=f"metrics ({url or 'app'})")
        for s in samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s["labels"].items())
            v = s["value"]
            table.add_row(s["name"], labels,
                          str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:g}")
        return table

    async def nothing() -> None:
        return None

    async def fetch_url() -> list[dict[str, Any]]:
        return keep(await asyncio.to_thread(scrape))

    async def fetch_app(a: Stem) -> list[dict[str, Any]]:
        return keep(app_metrics(a, [await a.broker.stats(q) for q in _queues(a, queue)]))

    view = (_View(fetch_url, nothing, render, lambda d: [d]) if url is not None
            else _app_view(app_spec, fetch_app, render, lambda d: [d]))
    _show(view, json_out, watch, interval, count)
