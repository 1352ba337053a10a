"""CLI helpers: loading the user's app (``module:attribute``), one-line errors, option ranges."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stem._urls import mask_urls_in
from stem.app import Stem

if TYPE_CHECKING:
    import typer

# Typer is imported where an error needs it: ``stem worker start`` runs without it
# (see stem_cli._worker).


def error_line(message: str) -> None:
    """Print ``message`` as one ``stem: error:`` line on stderr, credentials masked.

    Every error the CLI shows goes through here: URLs (and ``password=`` pairs) in the
    message are masked whatever raised it, and line breaks are folded so a message is
    always one line.
    """
    text = " ".join(mask_urls_in(message).split())
    stream = sys.stderr
    if stream is not None:
        stream.write(f"stem: error: {text}\n")
        stream.flush()


#: Set (to anything but empty or 0) to get the traceback of an unexpected error as well.
TRACEBACK_ENV = "STEM_TRACEBACK"


def unexpected_error(exc: BaseException) -> int:
    """Report an error that is not Stem's own (a driver's error Stem does not wrap, or a
    bug) as one ``stem: error:`` line naming its type, masked like every other; with
    ``STEM_TRACEBACK=1`` the traceback comes first. Returns the exit status, 1."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        import traceback

        text = "".join(traceback.format_exception(exc))
        stream = sys.stderr
        if stream is not None:
            stream.write(mask_urls_in(text))
    error_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return 1


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line to stderr and return the Exit to raise."""
    import typer

    error_line(message)
    return typer.Exit(code)


def between(low: float, high: float, unit: str = "") -> Callable[[Any], Any]:
    """An option callback refusing values outside ``low..high`` (NaN too), naming the range."""
    def check(value: Any) -> Any:
        if value is not None and not low <= value <= high:  # NaN fails the comparison
            import typer

            raise typer.BadParameter(f"{value} is not in the range {_num(low)}..{_num(high)}{unit}")
        return value
    return check


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def load_app(spec: str) -> Stem:
    """Import ``module:attr`` (cwd on sys.path, like uvicorn/celery) and check it is a Stem."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise fail(f"--app {spec!r}: expected 'module:attribute', e.g. 'myproj.tasks:app'")
    attr = attr or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise fail(f"--app {spec!r}: module {module_name!r} not found "
                       "(run from your project root or fix PYTHONPATH)") from None
        raise fail(f"--app {spec!r}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise fail(f"--app {spec!r}: importing {module_name!r} raised "
                   f"{type(exc).__name__}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise fail(f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Stem):
        raise fail(f"--app {spec!r}: {attr!r} is a {type(obj).__name__}, not a stem.Stem app")
    return obj


def serve_metrics(port: int | None, app: Stem) -> None:
    """``--metrics-port``: serve Prometheus metrics for ``app`` (nothing when None)."""
    if port is None:
        return
    from stem import metrics
    from stem.log import get_logger

    try:
        rec = metrics.serve(port, app=app)
    except ImportError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"--metrics-port {port}: {exc}") from None
    get_logger("stem.metrics").info("metrics.serving", port=rec.port, path="/metrics")
