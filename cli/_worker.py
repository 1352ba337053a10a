"""``stem worker start`` without typer: its option table, a reader of plain command
lines, and the command's body.

A worker's start-up is part of its cost (``make bench`` W0: start → first task, idle
RSS). Typer and click, imported to parse a dozen options, were a tenth of it, and
typer's runtime (a pydantic adapter per option) more when the command runs. So the
console script (:mod:`stem_cli._entry`) reads a plain ``stem worker start`` command
line here, with this module's table, and runs :func:`run_worker` with no typer
imported. Anything else (``--help``, a malformed or unknown option, a value out of
range, an option's environment variable set, any other command) goes to the typer
application in :mod:`stem_cli.main`, which declares the same options with their help
and reports errors as always. ``tests/core/test_lazy_imports.py`` checks that both
read every plain command line alike and that the table matches typer's declarations.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stem.limits import DEFAULT_GC_THRESHOLD, MAX_GC_THRESHOLD
from stem.log import LOG_FORMATS, configure_logging, parse_level
from stem_cli._app import between, load_app, serve_metrics

#: Bounds of the numeric options (out of range: a usage error naming the range, exit 2).
MAX_CONCURRENCY = 10_000
MAX_PREFETCH_MULTIPLIER = 1_000
MAX_POOL = 1_024
MAX_GRACE = 86_400.0
MIN_BLOCK_TIME, MAX_BLOCK_TIME = 0.01, 3_600.0
MAX_COUNT = 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _bad_parameter(message: str) -> Exception:
    import typer  # only on the error path: the fast path never needs it

    return typer.BadParameter(message)


def log_level(value: str) -> str:
    """``--log-level``: any case of the stdlib level names, stored upper-case."""
    try:
        parse_level(value)
    except ValueError:
        raise _bad_parameter(
            f"{value!r} is not one of {', '.join(LOG_LEVELS)} (any case)") from None
    return value.upper()


def log_format(value: str) -> str:
    """``--log-format``: auto, pretty or json (any case), stored lower-case."""
    if value.lower() not in LOG_FORMATS:
        raise _bad_parameter(f"{value!r} is not one of {', '.join(LOG_FORMATS)}")
    return value.lower()


#: ``--log-format`` -> ``configure_logging(json=...)``: None lets it look at the terminal.
JSON_FOR_FORMAT: dict[str, bool | None] = {"auto": None, "pretty": False, "json": True}


@dataclass(frozen=True, slots=True)
class Opt:
    """One option of ``stem worker start``: its parameter name, spellings, type
    (``str``, ``int`` or ``float``), default (``REQUIRED``: none), value check,
    environment variable and whether it may be repeated (a list)."""

    name: str
    decls: tuple[str, ...]
    kind: type
    default: Any
    check: Callable[[Any], Any] | None = None
    envvar: str | None = None
    repeatable: bool = False


REQUIRED: Any = object()

#: The options, in the command's parameter order. Typer's declarations in
#: :func:`stem_cli.main.worker_start` take their checks (callbacks) and defaults from
#: here (:data:`OPTION`).
OPTIONS: tuple[Opt, ...] = (
    Opt("app_spec", ("--app", "-A"), str, REQUIRED),
    Opt("queue", ("--queue", "-Q"), str, None, repeatable=True),
    Opt("concurrency", ("--concurrency", "-c"), int, 16, between(1, MAX_CONCURRENCY)),
    Opt("grace", ("--grace",), float, 30.0, between(0, MAX_GRACE, " seconds")),
    Opt("block_time", ("--block-time",), float, 1.0,
        between(MIN_BLOCK_TIME, MAX_BLOCK_TIME, " seconds")),
    Opt("pool", ("--pool",), int, None, between(1, MAX_POOL)),
    Opt("max_tasks_per_child", ("--max-tasks-per-child",), int, None, between(1, MAX_COUNT)),
    Opt("max_memory_per_child", ("--max-memory-per-child",), int, None,
        between(1, MAX_COUNT)),
    Opt("prefetch_multiplier", ("--prefetch-multiplier",), int, 4,
        between(1, MAX_PREFETCH_MULTIPLIER)),
    Opt("log_level", ("--log-level",), str, "INFO", log_level),
    Opt("log_format", ("--log-format",), str, "auto", log_format),
    Opt("metrics_port", ("--metrics-port",), int, None, between(0, 65535),
        envvar="STEM_METRICS_PORT"),
    Opt("connect_timeout", ("--connect-timeout",), float, 0.0,
        between(0, MAX_GRACE, " seconds")),
    Opt("gc_threshold", ("--gc-threshold",), int, DEFAULT_GC_THRESHOLD,
        between(0, MAX_GC_THRESHOLD), envvar="STEM_GC_THRESHOLD"),
)
OPTION = {o.name: o for o in OPTIONS}
_BY_DECL = {d: o for o in OPTIONS for d in o.decls}
_INT = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
_DEFER: Any = object()


def _plain_value(kind: type, text: str) -> Any:
    """``text`` as ``kind`` when it is a plain value that typer reads the same way;
    else :data:`_DEFER`."""
    if kind is str:
        return text
    if kind is int and _INT.fullmatch(text):
        return int(text)
    if kind is float and _FLOAT.fullmatch(text):
        return float(text)
    return _DEFER


def parse(args: Sequence[str]) -> dict[str, Any] | None:
    """``stem worker start``'s keyword arguments for ``args`` (the whole command line
    after ``stem``), or None to let typer parse it.

    Reads the plain forms only (``--name value``, ``--name=value``, ``-X value``; whole
    numbers and decimals as typer reads them) and applies each option's check, the
    defaults included. Anything else (``--help``, an unknown, repeated or malformed
    option, a value a check refuses, an option's environment variable set) returns
    None, and typer parses the command line and reports the error as always.
    """
    if list(args[:2]) != ["worker", "start"]:
        return None
    given: dict[str, Any] = {}
    rest = list(args[2:])
    while rest:
        token = rest.pop(0)
        decl, eq, text = token.partition("=") if token.startswith("--") else (token, "", "")
        opt = _BY_DECL.get(decl)
        if opt is None:
            return None
        if not eq:
            if not rest or rest[0].startswith("-"):
                return None
            text = rest.pop(0)
        value = _plain_value(opt.kind, text)
        if value is _DEFER or (opt.name in given and not opt.repeatable):
            return None
        given[opt.name] = [*given.get(opt.name, []), value] if opt.repeatable else value
    kwargs: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.name in given:
            value = given[opt.name]
        elif opt.envvar is not None and opt.envvar in os.environ:
            return None  # typer reads (and checks) the environment variable
        elif opt.default is REQUIRED:
            return None  # a required option is missing: typer says so
        else:
            value = opt.default
        if opt.check is not None:
            try:
                value = opt.check(value)
            except Exception:  # typer.BadParameter: typer reports it
                return None
        kwargs[opt.name] = value
    return kwargs


def run_worker(
    app_spec: str,
    queue: list[str] | None = None,
    concurrency: int = 16,
    grace: float = 30.0,
    block_time: float = 1.0,
    pool: int | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
    prefetch_multiplier: int = 4,
    log_level: str = "INFO",
    log_format: str = "auto",
    metrics_port: int | None = None,
    connect_timeout: float = 0.0,
    gc_threshold: int = DEFAULT_GC_THRESHOLD,
) -> int:
    """Run a worker until SIGTERM/SIGINT (then drain); return the exit status: 0, or 1
    when a second signal cut the drain short."""
    from stem.worker import Worker
    from stem.worker.gctune import tune_gc

    configure_logging(log_level, json=JSON_FOR_FORMAT[log_format])
    stem_app = load_app(app_spec)
    serve_metrics(metrics_port, stem_app)
    worker = Worker(stem_app, queues=queue, concurrency=concurrency, shutdown_grace=grace,
                    block_time=block_time, pool_size=pool, app_spec=app_spec,
                    max_tasks_per_child=max_tasks_per_child,
                    max_memory_per_child=max_memory_per_child,
                    prefetch_multiplier=prefetch_multiplier, connect_timeout=connect_timeout)
    tune_gc(gc_threshold)  # after the app and its tasks are imported: they are frozen

    async def main() -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                worker.request_stop()
            elif main_task is not None:  # a second signal: stop now
                main_task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await worker.run()
        finally:
            await stem_app.close()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        return 1
    return 0
