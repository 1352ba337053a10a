"""``stem beat`` (dispatch periodic tasks) and ``stem schedule`` (edit the schedule store)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer

from stem._time import from_iso, to_iso, utcnow
from stem.config import StemConfig
from stem.errors import ConfigurationError
from stem.log import configure_logging, get_logger
from stem_cli._app import between, fail, load_app, serve_metrics

# The beat's code and rich are imported by the commands that use them: a worker's CLI
# (which registers these commands) does not load them.
if TYPE_CHECKING:
    from rich.console import Console

    from stem.beat.entry import ScheduleEntry
    from stem.beat.stores import BeatStores

T = TypeVar("T")
log = get_logger("stem.beat")

schedule_app = typer.Typer(help="List, apply and edit schedule entries.", no_args_is_help=True)

StoreOpt = Annotated[str | None, typer.Option(
    "--schedule-store", help="Schedule store URL, file:// path or .json/.yaml file (default: "
    "STEM_SCHEDULE_STORE_URL, else STEM_SCHEDULE_FILE, else .stem/schedules.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
LIST_COLUMNS = ("id", "task", "queue", "spec", "next run", "last run", "jitter", "enabled")


def _console() -> Console:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=100_000, soft_wrap=True)


def _echo_json(value: Any) -> None:
    typer.echo(orjson.dumps(value).decode())


def beat_command(
    app_spec: Annotated[str, typer.Option("--app", "-A", help="Your app as module:attribute.")],
    schedule_store: StoreOpt = None,
    lock_store: Annotated[str | None, typer.Option(
        "--lock-store", help="Lock store URL shared by all beats (default: "
        "STEM_LOCK_STORE_URL, else the schedule store's URL, else the app's broker store).")
    ] = None,
    max_interval: Annotated[float, typer.Option(
        "--max-interval", callback=between(0.01, 3600, " seconds"),
        help="Re-read every entry at least this often (seconds).")] = 5.0,
    tick: Annotated[float, typer.Option("--tick", callback=between(0.01, 3600, " seconds"),
                    help="Longest sleep between two looks at the store (seconds).")] = 1.0,
    lock_ttl: Annotated[float, typer.Option(
        "--lock-ttl", callback=between(0.1, 3600, " seconds"),
        help="Lease of an entry's lock while it is dispatched (seconds).")] = 5.0,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ...")
                         ] = "INFO",
    log_format: Annotated[str, typer.Option("--log-format", help="auto, pretty or json.")
                          ] = "auto",
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", envvar="STEM_METRICS_PORT", callback=between(0, 65535),
        help="Serve Prometheus metrics on this port (/metrics; needs the metrics extra).")
    ] = None,
) -> None:
    """Dispatch due schedule entries as tasks until SIGTERM/SIGINT.

    Entries declared in the app's code (``@app.periodic``) are merged into the schedule
    store first. Several beats may share one schedule store and lock store; with a
    file store, run only one.
    """
    from stem.beat.beat import Beat
    from stem.beat.stores import open_beat_stores

    configure_logging(log_level.upper(), json={"auto": None, "pretty": False,
                                               "json": True}.get(log_format.lower()))
    stem_app = load_app(app_spec)
    serve_metrics(metrics_port, stem_app)

    async def main() -> None:
        stores = open_beat_stores(schedule_store, lock_store, namespace=stem_app.namespace,
                                  app_store=None)
        if stores.locks is None:
            app_store = stem_app.broker_store
            if app_store is not None:
                try:
                    stores.locks, stores.lock_url = app_store.locks, app_store.url
                except (NotImplementedError, AttributeError):
                    log.warning("beat.no_locks", detail="the app's broker store has no lock "
                                "store: run a single beat, or give --lock-store")
        beat = Beat(stem_app, schedules=stores.schedules, locks=stores.locks, tick=tick,
                    lock_ttl=lock_ttl, max_interval=max_interval)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, beat.request_stop)
        log.info("beat.stores", schedules=stores.schedule_url, locks=stores.lock_url)
        try:
            await beat.run()
        finally:
            await stores.close()
            await stem_app.close()

    asyncio.run(main())


def _with_store(url: str | None, op: Callable[[BeatStores], Awaitable[T]]) -> T:
    from stem.beat.stores import open_beat_stores

    async def go() -> T:
        stores = open_beat_stores(url, namespace=StemConfig.from_env().namespace,
                                  want_locks=False)
        try:
            return await op(stores)
        finally:
            await stores.close()
    return asyncio.run(go())


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@schedule_app.command("list")
def schedule_list(schedule_store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Every entry: task, queue, spec, next and last run, jitter, enabled."""
    from rich.table import Table

    from stem.beat.specs import describe

    entries = _with_store(schedule_store, lambda s: s.schedules.entries())
    if json_out:
        _echo_json([e.to_dict() for e in entries])
        return
    table = Table(*LIST_COLUMNS, title="schedules")
    for e in entries:
        table.add_row(e.id, e.task, e.queue, describe(e.spec) + (f" ({e.timezone})"
                      if e.timezone else ""), _when(e.next_run_at), _when(e.last_run_at),
                      f"{e.jitter_ms}ms" if e.jitter_ms else "-", "yes" if e.enabled else "no")
    _console().print(table)


@schedule_app.command("show")
def schedule_show(entry_id: str, schedule_store: StoreOpt = None, json_out: JsonOpt = False
                  ) -> None:
    """One entry and its latest runs."""
    from rich.table import Table

    async def op(s: BeatStores) -> tuple[ScheduleEntry | None, list[Any]]:
        entry = await s.schedules.get(entry_id)
        return entry, (await s.schedules.history(entry_id, 10) if entry else [])

    entry, runs = _with_store(schedule_store, op)
    if entry is None:
        raise fail(f"no schedule entry {entry_id!r}", 1)
    if json_out:
        _echo_json({**entry.to_dict(), "history": [r.to_dict() for r in runs]})
        return
    table = Table(show_header=False, title=f"schedule {entry.id}")
    for key, value in entry.to_dict().items():
        if value not in (None, {}, []):
            table.add_row(key, value if isinstance(value, str) else orjson.dumps(value).decode())
    for r in runs:
        table.add_row("run", f"{to_iso(r.executed_at)} {'ok' if r.success else 'failed'}"
                      + (f": {r.error}" if r.error else ""))
    _console().print(table)


def _diff(old: ScheduleEntry | None, new: ScheduleEntry) -> dict[str, Any]:
    if old is None:
        return {"action": "create", "id": new.id, "changes": {}}
    changes = {}
    for key in ("taskName", "spec", "args", "kwargs", "queue", "enabled", "timezone",
                "jitterMs", "expireAt", "meta"):
        before, after = old.to_dict().get(key), new.to_dict().get(key)
        if before != after:
            changes[key] = {"from": before, "to": after}
    return {"action": "update" if changes else "unchanged", "id": new.id, "changes": changes}


@schedule_app.command("apply")
def schedule_apply(
    file: Annotated[Path, typer.Argument(help="JSON or YAML schedule file.")],
    schedule_store: StoreOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; write nothing.")
                       ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create or update the file's entries (their run history is kept; entries not in the
    file are left alone)."""
    from stem.beat.beat import sync_entries
    from stem.beat.file_store import entries_from_document, load_document

    try:
        text = file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}") from None
    document = load_document(text, yaml=file.suffix.lower() in (".yaml", ".yml"),
                             source=str(file))
    wanted = entries_from_document(document, source=str(file))

    async def op(s: BeatStores) -> list[dict[str, Any]]:
        diffs = [_diff(await s.schedules.get(e.id), e) for e in wanted]
        if not dry_run:
            await sync_entries(s.schedules, wanted)
        return diffs

    diffs = _with_store(schedule_store, op)
    if json_out:
        _echo_json({"dryRun": dry_run, "entries": diffs})
        return
    for d in diffs:
        action = d["action"] if not dry_run or d["action"] == "unchanged" \
            else f"would {d['action']}"
        typer.echo(f"{d['id']}: {action}")
        for key, change in d["changes"].items():
            typer.echo(f"  {key}: {orjson.dumps(change['from']).decode()} -> "
                       f"{orjson.dumps(change['to']).decode()}")


@schedule_app.command("delete")
def schedule_delete(entry_id: str, schedule_store: StoreOpt = None,
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
                    json_out: JsonOpt = False) -> None:
    """Delete an entry and its run history."""
    if not yes and not json_out:
        typer.confirm(f"Delete schedule entry {entry_id!r}?", abort=True)
    removed = _with_store(schedule_store, lambda s: s.schedules.remove(entry_id))
    if not removed:
        raise fail(f"no schedule entry {entry_id!r}", 1)
    _echo_json({"id": entry_id, "deleted": True}) if json_out else \
        typer.echo(f"{entry_id}: deleted")


def _set_enabled(entry_id: str, url: str | None, enabled: bool, json_out: bool) -> None:
    async def op(s: BeatStores) -> ScheduleEntry | None:
        for _ in range(5):
            entry = await s.schedules.get(entry_id)
            if entry is None:
                return None
            changed = entry.copy(enabled=enabled)
            if enabled and not entry.enabled:
                from stem.beat.specs import next_run
                changed.next_run_at = next_run(changed.copy(next_run_at=None), utcnow())
            try:
                return await s.schedules.upsert(changed, expected_version=entry.version)
            except Exception as exc:
                from stem.errors import ScheduleConflictError
                if not isinstance(exc, ScheduleConflictError):
                    raise
        raise ConfigurationError(f"schedule entry {entry_id!r} kept changing; try again")

    stored = _with_store(url, op)
    if stored is None:
        raise fail(f"no schedule entry {entry_id!r}", 1)
    if json_out:
        _echo_json(stored.to_dict())
    else:
        typer.echo(f"{entry_id}: {'enabled' if enabled else 'disabled'}")


@schedule_app.command("enable")
def schedule_enable(entry_id: str, schedule_store: StoreOpt = None,
                    json_out: JsonOpt = False) -> None:
    """Enable an entry (its next run is computed from now)."""
    _set_enabled(entry_id, schedule_store, True, json_out)


@schedule_app.command("disable")
def schedule_disable(entry_id: str, schedule_store: StoreOpt = None,
                     json_out: JsonOpt = False) -> None:
    """Disable an entry (a beat stops dispatching it)."""
    _set_enabled(entry_id, schedule_store, False, json_out)


@schedule_app.command("dry-run")
def schedule_dry_run(
    spec: Annotated[str | None, typer.Option("--spec", help="A spec: cron, every:30s or "
                    "JSON.")] = None,
    entry_id: Annotated[str | None, typer.Option("--id", help="Preview this entry's spec.")
                        ] = None,
    count: Annotated[int, typer.Option("--count", "-n", callback=between(1, 10_000),
                     help="How many fire times.")] = 5,
    tz: Annotated[str | None, typer.Option("--tz", help="IANA time zone for cron specs.")
                  ] = None,
    start: Annotated[str | None, typer.Option("--from", help="Start after this ISO time "
                     "(default: now).")] = None,
    schedule_store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Preview the next fire times of a spec (or of an entry, in its time zone)."""
    from stem.beat.specs import next_fire, normalize_spec, parse_spec, zone

    if (spec is None) == (entry_id is None):
        raise fail("give either --spec or --id")
    if entry_id is not None:
        entry = _with_store(schedule_store, lambda s: s.schedules.get(entry_id))
        if entry is None:
            raise fail(f"no schedule entry {entry_id!r}", 1)
        raw: Any = entry.spec
        tz = tz or entry.timezone
    else:
        assert spec is not None
        raw = orjson.loads(spec) if spec.lstrip().startswith("{") else spec
        normalize_spec(raw)
    parsed = parse_spec(raw, entry_id=entry_id)
    shown = zone(tz)
    try:
        after = from_iso(start) if start else utcnow()
    except ValueError:
        raise fail(f"--from {start!r} is not an ISO-8601 time") from None
    times: list[datetime] = []
    anchor = None
    for _ in range(count):
        nxt = next_fire(parsed, after, timezone=tz, anchor=anchor, ran=bool(times))
        if nxt is None:
            break
        times.append(nxt)
        after = anchor = nxt
    if json_out:
        _echo_json([t.astimezone(shown).isoformat() for t in times])
        return
    for t in times:
        typer.echo(t.astimezone(shown).isoformat())
