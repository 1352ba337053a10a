"""Loading the user's app from ``module:attribute`` with one clear line on failure."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from stem.app import Stem


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    typer.echo(f"stem: error: {message}", err=True)
    return typer.Exit(code)


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
