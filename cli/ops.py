"""Operational commands: ``stem dlq`` and ``stem observe``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from stem.app import Stem
from stem_cli._app import between, load_app

T = TypeVar("T")

dlq_app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
observe_app = typer.Typer(help="Look at queues.", no_args_is_help=True)

AppOpt = Annotated[str | None, typer.Option("--app", "-A",
                   help="App whose broker to use (default: STEM_* environment).")]
QueueOpt = Annotated[list[str] | None, typer.Option("--queue", "-Q",
                     help="Queue (repeatable; default: the app's queues).")]
#: Largest --limit (stores take the count as a 32/64-bit integer).
MAX_LIMIT = 1_000_000


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
    limit: Annotated[int, typer.Option("--limit", callback=between(1, MAX_LIMIT),
                     help=f"At most this many per queue (1..{MAX_LIMIT}).")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Dead letters, oldest first, with the reason each was dead-lettered."""
    async def op(a: Stem) -> list[Any]:
        out = []
        for q in _queues(a, queue):
            out += await a.broker.dead_letters(q, limit)
        return out

    letters = _run(app_spec, op)
    if json_out:
        for d in letters:
            typer.echo(orjson.dumps({
                "id": d.id, "queue": d.queue, "reason": d.reason, "deadAt": d.dead_at,
                "task": d.envelope.name if d.envelope else None,
                "raw": d.raw.decode("utf-8", "replace")}).decode())
        return
    table = Table("id", "queue", "task", "dead at (UTC)", "reason", title="dead letters")
    for d in letters:
        when = datetime.fromtimestamp(d.dead_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(d.id, d.queue, d.envelope.name if d.envelope else "(undecodable)",
                      when, d.reason)
    Console().print(table)


@dlq_app.command("replay")
def dlq_replay(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", callback=between(1, MAX_LIMIT),
                     help=f"Replay at most this many per queue (1..{MAX_LIMIT}; "
                          "default: all).")] = None,
) -> None:
    """Publish dead letters again (attempt reset to 0); undecodable ones stay."""
    async def op(a: Stem) -> dict[str, int]:
        return {q: await a.broker.replay_dead_letters(q, limit) for q in _queues(a, queue)}

    done = _run(app_spec, op)
    for q, n in done.items():
        typer.echo(f"{q}: replayed {n}")


@dlq_app.command("purge")
def dlq_purge(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Delete dead letters for good."""
    if not yes:
        typer.confirm("Delete these dead letters for good?", abort=True)

    async def op(a: Stem) -> dict[str, int]:
        return {q: await a.broker.purge_dead_letters(q) for q in _queues(a, queue)}

    done = _run(app_spec, op)
    for q, n in done.items():
        typer.echo(f"{q}: purged {n}")


@observe_app.command("queues")
def observe_queues(
    app_spec: AppOpt = None,
    queue: QueueOpt = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ready, delayed, in-flight and dead counts per queue."""
    async def op(a: Stem) -> list[Any]:
        return [await a.broker.stats(q) for q in _queues(a, queue)]

    stats = _run(app_spec, op)
    if json_out:
        for s in stats:
            typer.echo(orjson.dumps({"queue": s.queue, "pending": s.pending, "delayed": s.delayed,
                                     "inFlight": s.in_flight, "dead": s.dead}).decode())
        return
    table = Table("queue", "ready", "delayed", "in flight", "dead", title="queues")
    for s in stats:
        table.add_row(s.queue, str(s.pending), str(s.delayed), str(s.in_flight), str(s.dead))
    Console().print(table)
