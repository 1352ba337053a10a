"""Operational commands: ``stem dlq`` (``stem observe`` is in :mod:`stem_cli.observe`)."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
import typer

from stem.app import Stem
from stem.ports import DeadLetter
from stem.retry import MAX_RETRY_DELAY
from stem_cli._app import between, fail, load_app

T = TypeVar("T")

dlq_app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)

AppOpt = Annotated[str | None, typer.Option("--app", "-A",
                   help="App whose broker to use (default: STEM_* environment).")]
QueueOpt = Annotated[list[str] | None, typer.Option("--queue", "-Q",
                     help="Queue (repeatable; default: the app's queues).")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Only dead letters dead-lettered at or after this ISO-8601 time "
                    "(UTC unless it has an offset), e.g. 2026-03-21T10:00:00.")]
#: Largest --limit (stores take the count as a 32/64-bit integer).
MAX_LIMIT = 1_000_000
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_since(value: str | None) -> float | None:
    """``--since`` as epoch seconds (a naive time is UTC); exit 2 naming the format."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"--since {value!r} is not an ISO-8601 time, e.g. "
                   "2026-03-21T10:00:00 or 2026-03-21T10:00:00+02:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_duration(value: str | None, option: str) -> float | None:
    """A duration such as ``5s``, ``500ms``, ``2m``, ``1h``, ``1d`` or ``30`` (seconds)."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        raise fail(f"{option} {value!r} is not a duration; use e.g. 30s, 500ms, 5m, 1h or 1d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_RETRY_DELAY:
        raise fail(f"{option} {value!r} is longer than a year")
    return seconds


#: Dead letters replayed per broker call: a replay of thousands moves a progress bar.
REPLAY_BATCH = 500


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr for a long operation (``total`` items); yields the
    function that advances it. Nothing is drawn when stderr is not a terminal or
    ``total`` is small, so piped output and logs stay clean."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal or total < PROGRESS_MIN) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


#: Operations on fewer items than this finish without a progress bar.
PROGRESS_MIN = 100


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _letter_json(d: DeadLetter) -> dict[str, Any]:
    return {"id": d.id, "queue": d.queue, "reason": d.reason, "error": d.meta.get("error"),
            "deadAt": d.dead_at,
            "task": d.envelope.name if d.envelope else None,
            "attempt": d.envelope.attempt if d.envelope else None,
            "raw": d.raw.decode("utf-8", "replace")}


def _run(app_spec: str | None, op: Callable[[Stem], Awaitable[T]]) -> T:
    stem_app = load_app(app_spec) if app_spec else Stem.from_env()

    async def go() -> T:
        try:
            return await op(stem_app)
        finally:
            await stem_app.close()

    return asyncio.run(go())  # a StemError becomes one line in stem_cli.main.run


def _queues(stem_app: Stem, queue: list[str] | None) -> list[str]:
    if queue:
        return queue
    names = [stem_app.default_queue]
    names += [d.options.queue for d in stem_app.tasks.values() if d.options.queue not in names]
    return list(dict.fromkeys(names))


@dlq_app.command("list")
def dlq_list(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-l", callback=between(1, MAX_LIMIT),
                     help=f"At most this many per queue (1..{MAX_LIMIT}).")] = 50,
    offset: Annotated[int, typer.Option("--offset", callback=between(0, 10**12),
                      help="Skip this many first (per queue): the next page.")] = 0,
    since: SinceOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Dead letters, oldest first, with the reason each was dead-lettered."""
    from rich.console import Console
    from rich.table import Table

    after = parse_since(since)

    async def op(a: Stem) -> list[Any]:
        out = []
        for q in _queues(a, queue):
            out += await a.broker.dead_letters(q, limit, offset=offset, since=after)
        return out

    letters = _run(app_spec, op)
    if json_out:
        for d in letters:
            typer.echo(orjson.dumps(_letter_json(d)).decode())
        return
    table = Table("id", "queue", "task", "dead at (UTC)", "reason", "error",
                  title="dead letters")
    for d in letters:
        table.add_row(d.id, d.queue, d.envelope.name if d.envelope else "(undecodable)",
                      _when(d.dead_at), d.reason, d.meta.get("error") or "")
    Console().print(table)


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID", help="The dead letter's id "
                              "(the task id; `stem dlq list` shows it).")],
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """One dead letter: why it was dead-lettered, when, and its whole envelope."""
    async def op(a: Stem) -> DeadLetter | None:
        for q in _queues(a, queue):
            found = await a.broker.get_dead_letter(q, dead_letter_id)
            if found is not None:
                return found
        return None

    d = _run(app_spec, op)
    if d is None:
        raise fail(f"no dead letter {dead_letter_id!r} in the queues looked at; "
                   "name its queue with --queue", 1)
    if json_out:
        typer.echo(orjson.dumps(_letter_json(d)).decode())
        return
    typer.echo(f"id:       {d.id}")
    typer.echo(f"queue:    {d.queue}")
    typer.echo(f"task:     {d.envelope.name if d.envelope else '(undecodable)'}")
    if d.envelope is not None:
        typer.echo(f"attempt:  {d.envelope.attempt} (max retries {d.envelope.max_retries})")
    typer.echo(f"dead at:  {_when(d.dead_at)} UTC")
    typer.echo(f"reason:   {d.reason}")
    if d.meta.get("error"):
        typer.echo(f"error:    {d.meta['error']}")
    if d.envelope is not None:
        body = orjson.dumps(orjson.loads(d.envelope.to_json()), option=orjson.OPT_INDENT_2)
        typer.echo("envelope:\n" + body.decode())
    else:
        typer.echo("raw:      " + d.raw.decode("utf-8", "replace")[:2000])


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(
        metavar="[ID]...", help="Replay only these dead letters (default: all that match "
                                "the filters).")] = None,
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", "-l", callback=between(1, MAX_LIMIT),
                     help=f"Replay at most this many per queue (1..{MAX_LIMIT}; "
                          "default: all).")] = None,
    since: SinceOpt = None,
    delay: Annotated[str | None, typer.Option(
        "--delay", help="Run them this long from now (e.g. 30s, 5m, 1h); default: now.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be "
                                          "replayed.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Publish dead letters again as fresh runs (attempt 0, whole retry budget).

    Undecodable dead letters stay. Asks first unless --yes; with no terminal to ask on, --yes is required.
    """
    after = parse_since(since)
    wait = parse_duration(delay, "--delay")
    wanted = list(dict.fromkeys(ids)) if ids else None

    async def candidates(a: Stem) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for q in _queues(a, queue):
            found = [d for d in await a.broker.dead_letters(q, MAX_LIMIT, since=after)
                     if d.envelope is not None and (wanted is None or d.id in wanted)]
            out += found[:limit] if limit is not None else found
        return out

    chosen: list[DeadLetter] | None = None  # with --yes, listed in the same run below
    if dry_run or not yes:
        chosen = letters = _run(app_spec, candidates)
        if not letters:
            typer.echo("nothing to replay")
            return
        for d in letters:
            task = d.envelope.name if d.envelope else "?"
            typer.echo(f"{d.queue}: {d.id} {task} (dead at {_when(d.dead_at)} UTC: {d.reason})")
        if dry_run:
            typer.echo(f"would replay {len(letters)} (dry run: nothing changed)")
            return
        if not sys.stdin.isatty():
            raise fail(f"replaying {len(letters)} dead letters needs confirmation and there "
                       "is no terminal to ask on; pass --yes", 2)
        typer.confirm(f"Replay these {len(letters)} dead letters?", abort=True)

    async def op(a: Stem) -> dict[str, int]:
        todo = chosen if chosen is not None else await candidates(a)
        by_queue: dict[str, list[str]] = {}
        for d in todo:
            by_queue.setdefault(d.queue, []).append(d.id)
        done = dict.fromkeys(_queues(a, queue), 0)
        with progress_bar(len(todo), "replaying") as advance:
            for q, q_ids in by_queue.items():
                for i in range(0, len(q_ids), REPLAY_BATCH):
                    batch = q_ids[i:i + REPLAY_BATCH]
                    done[q] += await a.broker.replay_dead_letters(
                        q, None, ids=batch, since=after, delay=wait)
                    advance(len(batch))
        return done

    done = _run(app_spec, op)
    for q, n in done.items():
        typer.echo(f"{q}: replayed {n}")


@dlq_app.command("purge")
def dlq_purge(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete dead letters for good."""
    if not yes:
        typer.confirm("Delete these dead letters for good?", abort=True)

    async def op(a: Stem) -> dict[str, int]:
        names = _queues(a, queue)
        total = sum([(await a.broker.stats(q)).dead for q in names])
        done: dict[str, int] = {}
        with progress_bar(total, "purging") as advance:
            for q in names:
                done[q] = await a.broker.purge_dead_letters(q)
                advance(done[q])
        return done

    done = _run(app_spec, op)
    for q, n in done.items():
        typer.echo(f"{q}: purged {n}")
