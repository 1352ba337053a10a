"""Control commands: ``stem worker revoke``, ``stem purge`` (and the control plane)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from stem._time import to_iso
from stem.app import Stem
from stem_cli._app import error_line, fail
from stem_cli.ops import AppOpt, _queues, _run, parse_duration

if TYPE_CHECKING:
    from rich.table import Table

    from stem.control import ControlReply
    from stem.revoke import RevokeEntry


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
    from rich.console import Console
    from rich.table import Table

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


WorkerOpt = Annotated[list[str] | None, typer.Option(
    "--worker", "-w", help="Only this worker (its name, as `stem worker status` shows; "
                           "repeatable). Default: every live worker.")]
TimeoutOpt = Annotated[str, typer.Option(
    "--timeout", help="How long to wait for replies, e.g. 5s (STEM_CONTROL_TIMEOUT).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the replies as JSON.")]


def _timeout(value: str | None) -> float:
    raw = value or os.environ.get("STEM_CONTROL_TIMEOUT") or "5s"
    seconds = parse_duration(raw, "--timeout")
    assert seconds is not None
    return seconds


def _send(app_spec: str | None, command: str, payload: dict[str, Any] | None,
          workers: list[str] | None, timeout: str | None,
          before: Callable[[Stem], Awaitable[None]] | None = None) -> list[ControlReply]:
    from stem.control import ControlClient

    async def op(a: Stem) -> list[ControlReply]:
        if before is not None:
            await before(a)
        return await ControlClient(a).send(command, payload, targets=workers,
                                           timeout=_timeout(timeout))

    return _run(app_spec, op)


def _finish(replies: list[ControlReply], workers: list[str] | None, json_out: bool,
            table: Callable[[list[ControlReply]], Table]) -> None:
    from rich.console import Console

    if json_out:
        typer.echo(orjson.dumps([r.to_json() for r in replies]).decode())
    elif replies:
        Console().print(table(replies))
    failed = [r for r in replies if not r.ok]
    for r in failed:
        error_line(f"worker {r.worker_id}: {r.error}")
    missing = sorted(set(workers or []) - {r.worker_id for r in replies})
    if missing:
        error_line(f"no reply from {', '.join(missing)}")
    if not replies:
        error_line("no worker answered (is one running with this namespace?)")
    if failed or missing or not replies:
        raise typer.Exit(1)


def _ms(value: Any) -> str:
    return f"{value / 1000:.1f}s" if isinstance(value, int | float) else ""


def worker_ping(app_spec: AppOpt = None, workers: WorkerOpt = None,
                timeout: TimeoutOpt = "", json_out: JsonOpt = False) -> None:
    """Ask workers to answer; lists those that did."""
    from rich.table import Table

    def table(rs: list[ControlReply]) -> Table:
        t = Table("worker", "status", "in flight", "queues", title="ping")
        t.columns[0].no_wrap = True
        for r in rs:
            t.add_row(r.worker_id, r.status, str(r.payload.get("inflight", "")),
                      ", ".join(r.payload.get("subscriptions", {}).get("queues", [])))
        return t

    _finish(_send(app_spec, "ping", None, workers, timeout), workers, json_out, table)


def worker_stats(app_spec: AppOpt = None, workers: WorkerOpt = None,
                 timeout: TimeoutOpt = "", json_out: JsonOpt = False) -> None:
    """Concurrency, in-flight, processed and failed counts, queues, pool, uptime."""
    from rich.table import Table

    def table(rs: list[ControlReply]) -> Table:
        t = Table("worker", "in flight", "done", "failed", "queues", "pool", "uptime",
                  title="stats")
        t.columns[0].no_wrap = True
        for r in rs:
            p = r.payload
            pool = p.get("pool") or {}
            queues = [q + (" (paused)" if q in p.get("pausedQueues", []) else "")
                      for q in p.get("queues", {})]
            t.add_row(r.worker_id, f"{p.get('inflight', '')}/{p.get('concurrency', '')}",
                      str(p.get("processed", "")), str(p.get("failed", "")),
                      ", ".join(queues),
                      f"{pool.get('kind', '')} {pool.get('processes') or ''}".strip(),
                      _ms(p.get("uptimeMs")))
        return t

    _finish(_send(app_spec, "stats", None, workers, timeout), workers, json_out, table)


def worker_inspect(app_spec: AppOpt = None, workers: WorkerOpt = None,
                   timeout: TimeoutOpt = "", json_out: JsonOpt = False,
                   include_revoked: Annotated[bool, typer.Option(
                       "--include-revoked/--no-revoked",
                       help="Also list the revocations each worker holds.")] = True) -> None:
    """The tasks running on each worker (with their runtime), paused queues, revocations."""
    from rich.table import Table

    def table(rs: list[ControlReply]) -> Table:
        t = Table("worker", "task id", "task", "queue", "attempt", "runtime", title="active")
        t.columns[0].no_wrap = True
        for r in rs:
            active = r.payload.get("active") or []
            if not active:
                t.add_row(r.worker_id, "-", "", "", "", "")
            for a in active:
                t.add_row(r.worker_id, str(a.get("id")), str(a.get("task")),
                          str(a.get("queue")), str(a.get("attempt")), _ms(a.get("runtimeMs")))
        return t

    replies = _send(app_spec, "inspect", {"includeRevoked": include_revoked}, workers, timeout)
    _finish(replies, workers, json_out, table)
    if not json_out and include_revoked:
        revoked = {e["taskId"] for r in replies for e in r.payload.get("revoked", [])}
        paused = {q for r in replies for q in r.payload.get("pausedQueues", [])}
        typer.echo(f"paused queues: {', '.join(sorted(paused)) or 'none'}; "
                   f"revoked tasks held: {len(revoked)}")


def worker_shutdown(
    app_spec: AppOpt = None, workers: WorkerOpt = None, timeout: TimeoutOpt = "",
    json_out: JsonOpt = False,
    mode: Annotated[str, typer.Option(
        "--mode", help="warm: finish running tasks, however long; soft: the worker's "
                       "--grace, then requeue; hard: requeue running tasks now.")] = "warm",
) -> None:
    """Stop workers through the control plane."""
    from rich.table import Table

    from stem.control import SHUTDOWN_MODES

    if mode not in SHUTDOWN_MODES:
        raise fail(f"--mode {mode!r}: use warm, soft or hard")

    def table(rs: list[ControlReply]) -> Table:
        t = Table("worker", "status", "mode", "active", title="shutdown")
        for r in rs:
            t.add_row(r.worker_id, str(r.payload.get("status", r.status)),
                      str(r.payload.get("mode", "")), str(r.payload.get("active", "")))
        return t

    _finish(_send(app_spec, "shutdown", {"mode": mode}, workers, timeout), workers, json_out,
            table)


QueuesOpt = Annotated[list[str], typer.Option("--queue", "-Q", help="Queue (repeatable).")]


def _pause_command(pause: bool) -> Callable[..., None]:
    def command(queue: QueuesOpt, app_spec: AppOpt = None, timeout: TimeoutOpt = "",
                json_out: JsonOpt = False,
                reason: Annotated[str | None, typer.Option("--reason")] = None) -> None:
        from rich.console import Console
        from rich.table import Table

        from stem.control import queue_entries

        async def store(a: Stem) -> None:
            entries = queue_entries(a, queue, pause=pause, reason=reason)
            await a.revokes.upsert_many(entries)  # durable first: survives restarts
            payload["entries"] = [e.to_json() for e in entries]

        payload: dict[str, Any] = {"queues": queue}
        replies = _send(app_spec, "queue_pause" if pause else "queue_resume", payload, None,
                        timeout, before=store)

        def table(rs: list[ControlReply]) -> Table:
            t = Table("worker", "status", "paused queues",
                      title="paused" if pause else "resumed")
            for r in rs:
                t.add_row(r.worker_id, r.status, ", ".join(r.payload.get("paused", [])))
            return t

        if json_out:
            typer.echo(orjson.dumps([r.to_json() for r in replies]).decode())
        else:
            typer.echo(f"{'paused' if pause else 'resumed'}: {', '.join(queue)} "
                       "(stored; workers started later honour it)")
            if replies:
                Console().print(table(replies))
        if any(not r.ok for r in replies):
            raise typer.Exit(1)

    command.__doc__ = ("Stop every worker consuming these queues (kept in the revoke "
                       "store: survives restarts) until `stem worker resume`." if pause
                       else "Consume paused queues again.")
    return command


def worker_status(
    app_spec: AppOpt = None, json_out: JsonOpt = False,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Refresh every interval until Ctrl-C.")] = False,
) -> None:
    """Workers with a heartbeat in the result backend; stale ones (no heartbeat for two
    intervals) are marked."""
    from rich.console import Console
    from rich.table import Table

    from stem.control import ControlClient, heartbeat_interval

    async def op(a: Stem) -> None:
        client = ControlClient(a)
        while True:
            beats = await client.workers()
            if json_out:
                typer.echo(orjson.dumps([{**h.data, "ageMs": round(h.age * 1000),
                                          "stale": h.stale} for h in beats]).decode())
            else:
                t = Table("worker", "state", "last seen", "in flight", "processed", "queues",
                          "paused", title="workers")
                t.columns[0].no_wrap = True
                for h in beats:
                    d = h.data
                    t.add_row(h.worker_id, "STALE" if h.stale else "live", f"{h.age:.0f}s ago",
                              str(d.get("inflight", "")), str(d.get("processed", "")),
                              ", ".join(d.get("queues", [])),
                              ", ".join(d.get("pausedQueues", [])))
                Console().print(t if beats else "no live workers")
            if not follow:
                return
            await asyncio.sleep(min(heartbeat_interval(), 5.0))

    try:
        _run(app_spec, op)
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer, worker_app: typer.Typer) -> None:
    """Add the control commands to the CLI."""
    worker_app.command("revoke")(worker_revoke)
    worker_app.command("ping")(worker_ping)
    worker_app.command("stats")(worker_stats)
    worker_app.command("inspect")(worker_inspect)
    worker_app.command("shutdown")(worker_shutdown)
    worker_app.command("pause")(_pause_command(True))
    worker_app.command("resume")(_pause_command(False))
    worker_app.command("status")(worker_status)
    app.command("purge")(purge)
    app.command("health")(health)


async def _check(component: str, url: str | None, probe: Callable[[], Awaitable[Any]]
                 ) -> dict[str, Any]:
    try:
        await asyncio.wait_for(probe(), HEALTH_TIMEOUT)
    except TimeoutError:
        return {"component": component, "url": url, "success": False,
                "message": f"no answer within {HEALTH_TIMEOUT:g}s: check the host and port"}
    except Exception as exc:
        return {"component": component, "url": url, "success": False,
                "message": " ".join((str(exc) or type(exc).__name__).split())}
    return {"component": component, "url": url, "success": True, "message": "reachable"}


#: Seconds each health check may take.
HEALTH_TIMEOUT = 10.0


def health(app_spec: AppOpt = None, json_out: JsonOpt = False) -> None:
    """Check the broker, the result backend and the configured stores (revoke store,
    rate limiter) answer; exit 0 when all do, 1 otherwise (a container health check)."""
    from rich.console import Console
    from rich.table import Table

    from stem.worker.worker import shown_url

    async def op(a: Stem) -> list[dict[str, Any]]:
        checks = [_check("broker", shown_url(a.broker_url), a.broker.ping),
                  _check("backend", shown_url(a.backend_url), a.backend.ping)]
        revoke_url = a.revoke_store_url
        checks.append(_check("revoke store", shown_url(revoke_url) if revoke_url
                             else "(the backend's store)",
                             lambda: a.revokes.changed_since(2**62)))
        if a.rate_limit_url is not None:
            url = a.rate_limit_url
            checks.append(_check("rate limiter", shown_url(url), a.store_for(url).ping))
        return list(await asyncio.gather(*checks))

    results = _run(app_spec, op)
    if json_out:
        typer.echo(orjson.dumps(results).decode())
    else:
        t = Table("component", "state", "url", "message", title="health")
        for r in results:
            t.add_row(r["component"], "ok" if r["success"] else "FAILED", str(r["url"]),
                      r["message"])
        Console().print(t)
    if not all(r["success"] for r in results):
        raise typer.Exit(1)
