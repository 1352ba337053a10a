"""Control commands: ``stem worker revoke``, ``stem purge`` (and the control plane)."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from stem._time import to_iso
from stem.app import Stem
from stem.revoke import RevokeEntry
from stem_cli._app import fail
from stem_cli.ops import AppOpt, _queues, _run, parse_duration


def worker_revoke(
    task_ids: Annotated[list[str], typer.Argument(help="Task ids to revoke.")],
    app_spec: AppOpt = None,
    terminate: Annotated[bool, typer.Option(
        "--terminate", help="Also stop the task if it is running now.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why (stored with it).")] = None,
    expires_in: Annotated[str | None, typer.Option(
        "--expires-in", help="Stop applying after this long, e.g. 1h or 30m "
                             "(default: until pruned by hand).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """Revoke tasks: queued or delayed ones never run (stored cancelled); with
    --terminate a running one is stopped. Written to the revoke store first, then
    announced to the workers (which apply it within a second)."""
    ttl = parse_duration(expires_in, "--expires-in")
    if not task_ids:
        raise fail("name at least one task id to revoke")

    async def op(a: Stem) -> list[RevokeEntry]:
        return await a.revoke(task_ids, terminate=terminate, reason=reason, expires_in=ttl)

    entries = _run(app_spec, op)
    if json_out:
        typer.echo(orjson.dumps([e.to_json() for e in entries]).decode())
        return
    table = Table("task id", "terminate", "reason", "expires", title="revoked")
    for e in entries:
        table.add_row(e.task_id, "yes" if e.terminate else "no", e.reason or "",
                      to_iso(e.expires_at) if e.expires_at else "never")
    Console().print(table)


def purge(
    queue: Annotated[list[str] | None, typer.Option(
        "--queue", "-Q", help="Queue to empty (repeatable; default: the app's queues).")] = None,
    app_spec: AppOpt = None,
    task_id: Annotated[list[str] | None, typer.Option(
        "--id", help="Delete only the waiting task with this id (repeatable).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete waiting (ready and delayed) tasks of queues for good; leased (running)
    ones stay: revoke those."""
    what = f"task(s) {', '.join(task_id)}" if task_id else "every waiting task"
    if not yes:
        where = ", ".join(queue) if queue else "the app's queues"
        typer.confirm(f"Delete {what} of {where} for good?", abort=True)

    async def op(a: Stem) -> dict[str, int]:
        qs = _queues(a, queue)
        if task_id:
            return {q: await a.broker.delete(q, task_id) for q in qs}
        return {q: await a.broker.purge(q) for q in qs}

    for q, n in _run(app_spec, op).items():
        typer.echo(f"{q}: deleted {n}")


def register(app: typer.Typer, worker_app: typer.Typer) -> None:
    """Add the control commands to the CLI."""
    worker_app.command("revoke")(worker_revoke)
    app.command("purge")(purge)


