"""The ``stem`` console script (and ``python -m stem_cli``).

A plain ``stem worker start`` command line runs the worker without importing typer
(:mod:`stem_cli._worker`); every other command line goes to the typer application
(:func:`stem_cli.main.run`).
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if args[:2] == ["worker", "start"]:
        from stem_cli import _worker

        kwargs = _worker.parse(args)
        if kwargs is not None:
            sys.exit(_run_worker(kwargs))
    from stem_cli.main import run

    sys.exit(run(args))


def _run_worker(kwargs: dict[str, object]) -> int:
    """:func:`stem_cli._worker.run_worker` with the CLI's error handling (as
    :func:`stem_cli.main.run` does it): a StemError is one ``stem: error:`` line and exit 1,
    or 2 for a ConfigurationError; an error already reported (``fail``) exits with its
    status; any other error is one line too (:func:`stem_cli._app.unexpected_error`);
    Ctrl-C before the worker runs is ``aborted``, exit 1."""
    from stem.errors import ConfigurationError, StemError
    from stem_cli import _worker
    from stem_cli._app import error_line

    try:
        return _worker.run_worker(**kwargs)  # type: ignore[arg-type]
    except StemError as exc:
        error_line(str(exc) or type(exc).__name__)
        return 2 if isinstance(exc, ConfigurationError) else 1
    except (EOFError, KeyboardInterrupt):
        sys.stderr.write("\n")
        error_line("aborted")
        return 1
    except Exception as exc:
        typer = sys.modules.get("typer")
        if typer is not None and isinstance(exc, typer.Exit):  # from fail(): reported
            return int(exc.exit_code)
        from stem_cli._app import unexpected_error

        return unexpected_error(exc)
