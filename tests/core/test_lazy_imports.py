"""A worker imports what its broker needs and nothing it does not (the startup issue).

Each check runs ``stem worker start`` in a fresh interpreter up to the worker's run
(the broker and backend built, nothing connected) and reads ``sys.modules`` there.
What the broker's own driver imports is subtracted first: redis-py imports the
OpenTelemetry SDK (and so its API) and ``cryptography`` when they are installed, which
is not Stem's doing.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import stem
from stem_cli import main as cli

#: Imported by a worker only when it is configured to use them (or never).
NOT_FOR_A_PLAIN_WORKER = (
    "asyncpg", "aiosqlite", "sqlite3", "redis", "prometheus_client", "opentelemetry.trace",
    "cryptography.hazmat", "pydantic", "rich", "structlog", "anyio", "cronsim", "astral",
    "yaml", "stem.beat.beat", "stem.beat.specs", "stem.adapters.sqlite.broker",
)

_APP = """
import stem

app = stem.Stem("lazy")


@app.task(name="lazy.noop")
async def noop() -> None:
    return None
"""

_CHILD = """
import json, sys
import stem.worker.worker as worker_module

async def run(self):  # stop where the worker would start fetching
    self.app.broker, self.app.backend
    print(json.dumps(sorted(sys.modules)))

worker_module.Worker.run = run
from stem_cli._entry import main  # the console script
sys.argv = ["stem", "worker", "start", "--app", "lazy_app:app", "-c", "100",
            "--log-level", "WARNING", "--block-time", "1"]
main()
"""


def _modules(code: str, cwd: Path, env: dict[str, str]) -> set[str]:
    """``sys.modules`` of a fresh interpreter running ``code`` (which prints them last),
    with no ``STEM_*`` variables but ``env``'s."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=cwd, env={**base, **env})
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


@pytest.mark.parametrize(("url", "driver"), [
    ("redis://127.0.0.1:1/0", "redis.asyncio"),
    ("postgresql://u@127.0.0.1:1/db", "asyncpg"),
])
def test_worker_start_imports_only_its_broker(tmp_path: Path, url: str, driver: str) -> None:
    pytest.importorskip(driver)
    (tmp_path / "lazy_app.py").write_text(_APP)
    code = f"import json, sys, {driver}; print(json.dumps(sorted(sys.modules)))"
    baseline = _modules(code, tmp_path, {})
    worker = _modules(_CHILD, tmp_path, {"STEM_BROKER_URL": url, "STEM_NAMESPACE": "lazy"})
    assert driver.split(".")[0] in {m.split(".")[0] for m in worker}  # the broker's driver
    other = "asyncpg" if driver == "redis.asyncio" else "redis"
    assert other not in {m.split(".")[0] for m in worker}
    assert _loaded(worker - baseline, (*NOT_FOR_A_PLAIN_WORKER, "stem.canvas")) == []
    # A plain command line never reaches typer (nor its click, nor the other commands).
    assert _loaded(worker, ("typer", "click", "stem_cli.main", "stem_cli.control")) == []


def test_import_stem_and_the_cli_loads_no_optional_package() -> None:
    code = "import json, sys, stem, stem_cli.main; print(json.dumps(sorted(sys.modules)))"
    modules = _modules(code, Path.cwd(), {})
    assert _loaded(modules, (*NOT_FOR_A_PLAIN_WORKER, "stem.canvas")) == []
    code = "import json, sys; from stem import *; print(json.dumps(sorted(sys.modules)))"
    assert _loaded(_modules(code, Path.cwd(), {}), NOT_FOR_A_PLAIN_WORKER) == []


def test_public_names_still_import() -> None:
    for name in stem.__all__:
        assert getattr(stem, name) is not None, name
    from stem import Signature, chain, chord, group  # lazy: stem.canvas on first use
    from stem.canvas import Signature as canvas_signature

    assert Signature is canvas_signature
    assert (stem.chain, stem.chord, stem.group) == (chain, chord, group)
    assert set(stem.__all__) <= set(dir(stem))


# -- stem worker start reads its options without typer's runtime, as typer would -------


@pytest.mark.parametrize("args", [
    ["--app", "x:app", "-c", "100", "--log-level", "WARNING", "--block-time", "1"],
    ["-A", "x:app"],
    ["--app=x:app", "-Q", "a", "--queue", "b", "--grace=2.5", "--pool", "3",
     "--log-format", "JSON", "--log-level", "debug", "--prefetch-multiplier", "7",
     "--max-tasks-per-child", "10", "--max-memory-per-child", "2000",
     "--metrics-port", "9100", "--connect-timeout", ".5"],
    ["--app", "x:app", "--queue=only", "-c", "1", "--grace", "0"],
])
def test_worker_start_options_read_as_typer_reads_them(
        args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEM_METRICS_PORT", raising=False)
    fast = cli.worker_start_kwargs(["worker", "start", *args])
    assert fast is not None
    assert fast == _typer_kwargs(args)


@pytest.mark.parametrize("args", [
    ["--app", "x:app", "--help"],
    ["-c", "5"],  # --app missing
    ["--app", "x:app", "-c", "0"],  # out of range
    ["--app", "x:app", "-c", "1e3"],
    ["--app", "x:app", "-c", "5", "-c", "6"],
    ["--app", "x:app", "--grace", "nan"],
    ["--app", "x:app", "--log-level", "nope"],
    ["--app", "x:app", "extra"],
    ["--app", "x:app", "-c100"],
    ["--app", "x:app", "--unknown", "1"],
    ["--app", "x:app", "--log-level"],
])
def test_anything_unusual_is_left_to_typer(args: list[str]) -> None:
    assert cli.worker_start_kwargs(["worker", "start", *args]) is None


def test_an_option_from_the_environment_is_left_to_typer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEM_METRICS_PORT", "9100")
    assert cli.worker_start_kwargs(["worker", "start", "--app", "x:app"]) is None
    monkeypatch.delenv("STEM_METRICS_PORT")
    assert cli.worker_start_kwargs(["worker", "start", "--app", "x:app"]) is not None


def test_other_commands_are_left_to_typer() -> None:
    assert cli.worker_start_kwargs(["worker", "stats", "--app", "x:app"]) is None
    assert cli.worker_start_kwargs(["--version"]) is None
    assert cli.worker_start_kwargs([]) is None


def test_the_option_table_is_typers_declaration() -> None:
    """stem_cli._worker.OPTIONS (read without typer) and typer's declaration of
    ``stem worker start`` (its help, and every command line the table does not read)
    name the same options, spellings, defaults, checks and environment variables."""
    import inspect
    import typing

    from stem_cli import _worker

    hints = typing.get_type_hints(cli.worker_start, include_extras=True)
    params = inspect.signature(cli.worker_start).parameters
    assert list(params) == [o.name for o in _worker.OPTIONS]
    for opt in _worker.OPTIONS:
        annotation, info = typing.get_args(hints[opt.name])[:2]
        decls = list(info.param_decls or ())
        if isinstance(info.default, str) and info.default.startswith("-"):
            decls.insert(0, info.default)
        assert tuple(decls) == opt.decls, opt.name
        default = params[opt.name].default
        assert (_worker.REQUIRED if default is inspect.Parameter.empty else default) \
            == opt.default, opt.name
        assert info.callback is opt.check, opt.name
        assert info.envvar == opt.envvar, opt.name
        assert (annotation in (list[str], list[str] | None)) == opt.repeatable, opt.name
        assert annotation in (opt.kind, opt.kind | None, list[opt.kind] | None), opt.name


def _typer_kwargs(args: list[str]) -> dict[str, Any]:
    """What typer passes to ``stem worker start`` for ``args``."""
    got: dict[str, Any] = {}
    command = next(c for c in cli.worker_app.registered_commands if c.name == "start")
    original = command.callback
    assert original is not None

    @functools.wraps(original)
    def record(**kwargs: Any) -> None:
        got.update(kwargs)

    command.callback = record
    try:
        cli.app(args=["worker", "start", *args], prog_name="stem", standalone_mode=False)
    finally:
        command.callback = original
    return got


# -- stem.log's loggers make the records structlog's chain made, without structlog ------


def test_log_records_are_those_of_the_structlog_chain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    import structlog.contextvars

    from stem import log as stem_log

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("stem.test_lazy_log")
    handler = Keep()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    ours, theirs = stem_log.get_logger(logger.name), stem_log._wrap(logger.name)

    def calls(log: Any) -> None:
        log.debug("dropped.debug", a=1)
        log.info("info.event", a=1, b="x")
        log.warning("warning.event %s", 5, c=[1, 2])
        try:
            raise ValueError("boom")
        except ValueError as exc:
            log.exception("exception.event", d=None)
            log.error("error.event", exc_info=exc)
        log.critical("critical.event", exc_info=False)
        with structlog.contextvars.bound_contextvars(request="r1", a="shadowed"):
            log.info("context.event", a=2)

    try:
        calls(theirs)
        expected, records[:] = list(records), []
        calls(ours)
    finally:
        logger.removeHandler(handler)
    assert len(records) == len(expected) == 6
    for got, want in zip(records, expected, strict=True):
        assert (got.name, got.levelno, got.args) == (want.name, want.levelno, want.args)
        assert str(got.msg) == str(want.msg)
        assert getattr(got, stem_log.EVENT_ATTR) == getattr(want, stem_log.EVENT_ATTR)
        assert list(getattr(got, stem_log.EVENT_ATTR)) == list(
            getattr(want, stem_log.EVENT_ATTR))  # the same order of fields
        assert (got.exc_info is None) == (want.exc_info is None)
        if got.exc_info and want.exc_info:  # two raises: equal, not the same
            assert got.exc_info[0] is want.exc_info[0]
            assert str(got.exc_info[1]) == str(want.exc_info[1])
    assert ours.bind(x=1) is not None  # the rest of the API is structlog's
