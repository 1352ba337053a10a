"""``stem group``: look at a group, chord or batch record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import orjson
import typer

from stem.app import Stem
from stem_cli._app import between, fail
from stem_cli.ops import AppOpt, _run

if TYPE_CHECKING:
    from stem.groups import GroupRecord

group_app = typer.Typer(help="Look at groups, chords and batches.", no_args_is_help=True)


def _kind(record: GroupRecord) -> str:
    from stem.canvas import META_BATCH, META_CHORD_CALLBACK_ID

    if record.meta.get(META_BATCH) is True:
        return "batch"
    return "chord" if META_CHORD_CALLBACK_ID in record.meta else "group"


def _short(value: object, width: int = 60) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= width else text[: width - 3] + "..."


@group_app.command("show")
def group_show(
    group_id: Annotated[str, typer.Argument(help="The group, chord or batch id.")],
    app_spec: AppOpt = None,
    members: Annotated[int, typer.Option("--members", callback=between(0, 1_000_000),
                       help="Show at most this many member outcomes (0: none).")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="The whole record as JSON.")] = False,
) -> None:
    """A group's state, counters, chord claim and its members' outcomes in order."""
    from rich.console import Console
    from rich.table import Table

    from stem.canvas import META_CHORD_CALLBACK_ID

    async def op(a: Stem) -> GroupRecord | None:
        return await a.get_group(group_id)

    record = _run(app_spec, op)
    if record is None:
        raise fail(f"no group {group_id}: it was never created, or its record expired", 1)
    if json_out:
        typer.echo(orjson.dumps({"kind": _kind(record), **record.to_dict()},
                                default=str).decode())
        return
    console = Console()
    summary = Table("field", "value", title=f"{_kind(record)} {record.id}", show_header=False)
    summary.add_row("state", record.state)
    summary.add_row("members", f"{record.completed} of {record.expected} finished, "
                               f"{record.failed} failed or cancelled")
    if _kind(record) == "chord":
        summary.add_row("callback", f"{record.meta[META_CHORD_CALLBACK_ID]} "
                                    f"({'dispatched' if record.claimed else 'not dispatched'})")
    for label, when in (("created", record.created_at), ("expires", record.expires_at)):
        if when is not None:
            summary.add_row(label, when.strftime("%Y-%m-%d %H:%M:%S UTC"))
    console.print(summary)
    if members and record.members:
        table = Table("#", "task id", "state", "result / error", title="members")
        for m in record.members[:members]:
            detail = str(m.error) if m.error is not None else _short(m.result)
            table.add_row(str(m.index), m.task_id, m.state.value, detail)
        console.print(table)
        if len(record.members) > members:
            console.print(f"... {len(record.members) - members} more (--members N, or --json)")
