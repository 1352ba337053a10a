"""The ``stem`` command line."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from stem import __version__
from stem._urls import mask_url
from stem.app import Stem
from stem.errors import ConfigurationError, StemError
from stem.limits import DEFAULT_GC_THRESHOLD
from stem.task import isolation_for
from stem_cli import control
from stem_cli._app import between, error_line, fail, load_app, unexpected_error
from stem_cli._worker import (
    MAX_BLOCK_TIME,
    MAX_CONCURRENCY,
    MAX_GRACE,
    MAX_POOL,
    MAX_PREFETCH_MULTIPLIER,
    MIN_BLOCK_TIME,
    OPTION,
    run_worker,
)
from stem_cli._worker import parse as parse_worker_start
from stem_cli.beat import beat_command, schedule_app
from stem_cli.groups import group_app
from stem_cli.multi import healthcheck_command, multi_app
from stem_cli.observe import observe_app
from stem_cli.ops import dlq_app

if TYPE_CHECKING:
    from rich.console import Console

try:  # typer >= 0.22 ships its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer, on top of click
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

app = typer.Typer(help="Stem: asyncio-native background tasks.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
worker_app = typer.Typer(help="Run and control workers.", no_args_is_help=True)
tasks_app = typer.Typer(help="Inspect registered tasks.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
app.add_typer(tasks_app, name="tasks")
worker_app.add_typer(multi_app, name="multi")
worker_app.command("healthcheck")(healthcheck_command)
app.add_typer(dlq_app, name="dlq")
app.add_typer(observe_app, name="observe")
app.add_typer(group_app, name="group")
app.add_typer(schedule_app, name="schedule")
control.register(app, worker_app)
app.command("beat")(beat_command)

AppOpt = Annotated[str, typer.Option("--app", "-A", help="Your app as module:attribute.")]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"stem {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                       help="Print `stem <version>` and exit.")] = False,
) -> None:
    """Stem: asyncio-native background tasks."""


def _console() -> Console:
    """Rich output for a terminal; piped or redirected, never truncated (a table as wide
    as its widest row, whatever ``COLUMNS`` says)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=100_000, soft_wrap=True)

#: ``stem tasks ls``: the table's columns, in order, and the keys of each ``--json`` object.
TASKS_LS_COLUMNS = ("name", "queue", "max_retries", "priority", "isolation", "handler")


@worker_app.command("start")
def worker_start(
    app_spec: AppOpt,
    queue: Annotated[list[str] | None, typer.Option("--queue", "-Q",
                     help="Queue to consume (repeatable). Default: all queues of the app's tasks.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c",
                           callback=OPTION["concurrency"].check,
                           help=f"Tasks in flight at once (1..{MAX_CONCURRENCY}).")] = 16,
    grace: Annotated[float, typer.Option("--grace", callback=OPTION["grace"].check,
                     help="Seconds a graceful stop waits for running tasks "
                          f"(0..{MAX_GRACE:g}).")] = 30.0,
    block_time: Annotated[float, typer.Option("--block-time",
                          callback=OPTION["block_time"].check,
                          help="Seconds one fetch blocks when idle "
                               f"({MIN_BLOCK_TIME:g}..{MAX_BLOCK_TIME:g}).")] = 1.0,
    pool: Annotated[int | None, typer.Option("--pool", callback=OPTION["pool"].check,
                    help=f"Run def tasks in N (1..{MAX_POOL}) child processes (killable at "
                         "hard time limits). Default: only tasks that need it get a pool.")] = None,
    max_tasks_per_child: Annotated[int | None, typer.Option("--max-tasks-per-child",
                                   callback=OPTION["max_tasks_per_child"].check,
                                   help="Replace a pool child after this many tasks.")] = None,
    max_memory_per_child: Annotated[int | None, typer.Option("--max-memory-per-child",
                                    callback=OPTION["max_memory_per_child"].check,
                                    help="Replace a pool child once its resident memory "
                                         "exceeds this many KiB.")] = None,
    prefetch_multiplier: Annotated[int, typer.Option("--prefetch-multiplier",
                                   callback=OPTION["prefetch_multiplier"].check,
                                   help="Lease up to concurrency x this many tasks at once "
                                        f"(1..{MAX_PREFETCH_MULTIPLIER}).")] = 4,
    log_level: Annotated[str, typer.Option("--log-level", callback=OPTION["log_level"].check,
                         help="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).")] = "INFO",
    log_format: Annotated[str, typer.Option("--log-format", callback=OPTION["log_format"].check,
                          help="auto (pretty on a terminal, JSON lines otherwise), pretty "
                               "or json.")] = "auto",
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", envvar="STEM_METRICS_PORT", callback=OPTION["metrics_port"].check,
        help="Serve Prometheus metrics on this port (/metrics; needs the metrics extra).")
    ] = None,
    connect_timeout: Annotated[float, typer.Option("--connect-timeout",
                               callback=OPTION["connect_timeout"].check,
                               help="Seconds to wait for an unreachable broker or backend at "
                                    "startup, retrying with backoff (0: fail at once).")] = 0.0,
    gc_threshold: Annotated[int, typer.Option(
        "--gc-threshold", envvar="STEM_GC_THRESHOLD", callback=OPTION["gc_threshold"].check,
        help="The garbage collector's first-generation threshold for this process, set "
             "after start-up objects are frozen (0: Python's default, 700).")
    ] = DEFAULT_GC_THRESHOLD,
) -> None:
    """Start a worker: consume queues until SIGTERM/SIGINT, then drain and exit 0.

    Logs go to stderr: a ``worker.started`` banner (app, namespace, masked broker and
    backend URLs, queues, concurrency, prefetch, pool), then one line per finished task at
    INFO.
    """
    code = run_worker(app_spec, queue, concurrency, grace, block_time, pool,
                      max_tasks_per_child, max_memory_per_child, prefetch_multiplier,
                      log_level, log_format, metrics_port, connect_timeout, gc_threshold)
    if code:
        raise typer.Exit(code)


@tasks_app.command("ls")
def tasks_ls(
    app_spec: AppOpt,
    pool: Annotated[int | None, typer.Option("--pool", callback=between(1, MAX_POOL),
                    help="Show the isolation of a worker started with --pool N (as "
                         "`stem worker start --pool N`). Default: a worker without it.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects "
                        "(the table's column names as keys).")] = False,
) -> None:
    """List the tasks registered on the app, with where a worker runs each.

    The table's columns and the ``--json`` keys are the same names
    (:data:`TASKS_LS_COLUMNS`); piped, the table is never truncated.

    The isolation column is what a worker started with the same ``--pool`` option
    does (the rule is :func:`stem.task.isolation_for`); a call that overrides
    ``time_limit`` (``with_options``, ``Retry(time_limit=...)``) sends a ``def``
    handler to the process pool.
    """
    from rich.table import Table

    stem_app = load_app(app_spec)
    rows: list[dict[str, Any]] = []
    for name in sorted(stem_app.tasks):
        d = stem_app.tasks[name]
        rows.append({
            "name": name,
            "queue": d.options.queue,
            "max_retries": d.options.max_retries,
            "priority": d.options.priority,
            "isolation": isolation_for(d, d.options.time_limit, pool is not None),
            "handler": f"{d.func.__module__}.{d.func.__qualname__}" if d.func else None,
        })
    if json_out:
        typer.echo(orjson.dumps(rows).decode())
        return
    table = Table(*TASKS_LS_COLUMNS)
    for row in rows:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in TASKS_LS_COLUMNS))
    _console().print(table)


@app.command("result")
def result(
    task_id: str,
    app_spec: Annotated[str | None, typer.Option("--app", "-A",
                        help="App whose backend/encoders to use (default: STEM_* env).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the raw status JSON.")] = False,
) -> None:
    """Show a task's state, value, error, attempts and progress."""
    from rich.console import Console
    from rich.table import Table

    stem_app = load_app(app_spec) if app_spec else Stem.from_env()

    async def get() -> Any:
        try:
            status = await stem_app.backend.get(task_id)
            return status, (stem_app.to_result(status) if status else None)
        finally:
            await stem_app.close()

    status, res = asyncio.run(get())
    if status is None:
        raise fail(f"no result for task {task_id} (never enqueued, or its status expired)", 1)
    if json_out:
        typer.echo(status.to_json().decode())
        return
    table = Table(show_header=False)
    table.add_row("id", status.id)
    table.add_row("state", status.state.value)
    table.add_row("attempt", str(status.attempt))
    if res.value is not None:
        table.add_row("value", orjson.dumps(res.value, default=repr).decode())
    if status.error is not None:
        table.add_row("error", f"{status.error.type}: {status.error.message}")
    if res.progress is not None:
        table.add_row("progress", orjson.dumps(res.progress, default=repr).decode())
    Console().print(table)


@app.command("migrate")
def migrate(
    url: Annotated[str | None, typer.Option("--url",
                   help="Store URL (default: the app's broker and backend URLs with --app, "
                        "else STEM_BROKER_URL, then STEM_RESULT_BACKEND_URL).")] = None,
    app_spec: Annotated[str | None, typer.Option("--app", "-A",
                        help="Your app as module:attribute: migrate its stores, in its "
                             "namespace.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace",
                         help="Namespace to migrate (default: the app's with --app, else "
                              "STEM_NAMESPACE, else 'stem').")] = None,
) -> None:
    """Create or upgrade Stem's tables now (Postgres also does it on first connect).

    Tables live in a namespace (a Postgres schema, an SQLite table prefix), so say whose:
    ``--app`` (the app's URLs and namespace), ``--namespace``, or ``STEM_NAMESPACE``;
    without any of them it is ``stem``, the namespace of ``Stem()`` with no name.
    """
    from stem.config import StemConfig, check_namespace, check_url

    if app_spec is not None and namespace is not None:
        raise fail("give --app or --namespace, not both: the app's namespace is its own "
                   "(Stem(name, namespace=...) or STEM_NAMESPACE)", 2)
    checked_url = check_url(url, "--url") if url else None
    if namespace is not None:
        check_namespace(namespace, "--namespace")
    if app_spec is not None:
        stem_app = load_app(app_spec)
        for target, applied in asyncio.run(_migrate_app(stem_app, checked_url)):
            _say_migrated(target, stem_app.namespace, applied)
        return
    config = StemConfig.from_env()
    ns = namespace or config.namespace_for(None)
    targets = [checked_url] if checked_url else list(dict.fromkeys(
        u for u in (config.broker_url, config.backend_url) if u))
    for target in targets:
        _say_migrated(target, ns, asyncio.run(_migrate(target, ns)))


def _say_migrated(url: str, namespace: str, applied: list[int]) -> None:
    done = ", ".join(map(str, applied)) if applied else "none (already current)"
    typer.echo(f"{mask_url(url)} (namespace {namespace}): applied migrations {done}")


async def _migrate(url: str, namespace: str) -> list[int]:
    from stem.adapters import store_from_url
    from stem.tls import TlsConfig

    tls = TlsConfig.from_env()  # STEM_TLS_* apply to a bare URL too
    async with store_from_url(url if tls is None else tls.apply(url), namespace=namespace) as store:
        return await store.migrate()


async def _migrate_app(stem_app: Stem, url: str | None) -> list[tuple[str, list[int]]]:
    """Migrate ``url`` in the app's namespace, else the app's own broker and backend stores
    (stores passed to the app as objects included; adapter objects have none)."""
    if url is not None:
        return [(url, await _migrate(url, stem_app.namespace))]
    done: list[tuple[str, list[int]]] = []
    try:
        stores = [s for s in (stem_app.broker_store, stem_app.backend_store) if s is not None]
        if not stores:
            raise fail("the app's broker and backend are adapter objects, not stores: "
                       "nothing to migrate (pass --url)", 2)
        for store in [s for i, s in enumerate(stores) if s not in stores[:i]]:
            done.append((store.url, await store.migrate()))
    finally:
        await stem_app.close()
    return done


#: ``stem worker start``'s arguments read without typer (see :mod:`stem_cli._worker`),
#: or None to let typer parse them.
worker_start_kwargs = parse_worker_start


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    The one place errors become output: a :class:`StemError` from any command is one
    ``stem: error:`` line on stderr (credentials masked) and exit 1, or 2 for a
    :class:`ConfigurationError`; a usage error (unknown option, value out of range) is
    one line naming the option and exit 2, as click does. No traceback for either.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        fast = worker_start_kwargs(args)
        if fast is not None:  # as typer would call it, without its runtime (see there)
            return _call(worker_start, fast)
        rv = app(args=args, prog_name="stem", standalone_mode=False)
    except StemError as exc:
        error_line(str(exc) or type(exc).__name__)
        return 2 if isinstance(exc, ConfigurationError) else 1
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # rich help is already printed
            if exc.format_message().strip():
                typer.echo(exc.format_message(), err=True)
            return exc.exit_code
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if isinstance(exc, UsageError) and ctx is not None:
            message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
        error_line(message)
        return exc.exit_code
    except typer.Abort:
        error_line("aborted")
        return 1
    except Exception as exc:  # a driver's or a bug's: still one line (see unexpected_error)
        return unexpected_error(exc)
    return rv if isinstance(rv, int) else 0


def _call(command: Any, kwargs: dict[str, Any]) -> int:
    """Run a command as click's ``main(standalone_mode=False)`` does: its Exit is the exit
    status; Ctrl-C or EOF abort."""
    try:
        command(**kwargs)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (EOFError, KeyboardInterrupt):
        typer.echo(err=True)
        raise typer.Abort() from None
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
