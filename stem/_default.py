"""The module-level producer API: ``stem.enqueue``, ``stem.wait``, ... on a default app.

The default app is the one given to :func:`set_default_app`, else one built from the
``STEM_*`` environment (:meth:`Stem.from_env`) on first use, once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar, overload

from stem.app import Stem
from stem.status import TaskResult
from stem.task import TaskDefinition

R = TypeVar("R")

_lock = threading.Lock()
_default: Stem | None = None


def set_default_app(app: Stem | None) -> None:
    """Make ``app`` the one ``stem.enqueue`` and friends use (None: back to the environment's)."""
    global _default
    with _lock:
        _default = app


def default_app() -> Stem:
    """The default app: the one set with :func:`set_default_app`, else ``Stem.from_env()``."""
    global _default
    app = _default
    if app is None:
        with _lock:
            if _default is None:
                _default = Stem.from_env()
            app = _default
    return app


async def enqueue(task: str | TaskDefinition[..., Any], *args: Any,
                  countdown: float | None = None, eta: datetime | None = None,
                  headers: dict[str, str] | None = None, meta: dict[str, Any] | None = None,
                  expires: float | datetime | None = None, ignore_result: bool | None = None,
                  **kwargs: Any) -> str:
    """``await default_app().enqueue(...)``: publish one task by name (routed) or definition."""
    return await default_app().enqueue(task, *args, countdown=countdown, eta=eta,
                                       headers=headers, meta=meta, expires=expires,
                                       ignore_result=ignore_result, **kwargs)


def enqueue_sync(task: str | TaskDefinition[..., Any], *args: Any,
                 countdown: float | None = None, eta: datetime | None = None,
                 headers: dict[str, str] | None = None, meta: dict[str, Any] | None = None,
                 expires: float | datetime | None = None, ignore_result: bool | None = None,
                 **kwargs: Any) -> str:
    """``default_app().enqueue_sync(...)``: :func:`enqueue` for sync code."""
    return default_app().enqueue_sync(task, *args, countdown=countdown, eta=eta,
                                      headers=headers, meta=meta, expires=expires,
                                      ignore_result=ignore_result, **kwargs)


async def get_result(task_id: str) -> TaskResult[Any] | None:
    """``await default_app().get_result(task_id)``."""
    return await default_app().get_result(task_id)


@overload
async def wait(task_id: str, timeout: float | None = None, *,
               raise_on_failure: bool = False) -> TaskResult[Any]: ...


@overload
async def wait(task_id: str, timeout: float | None = None, *,
               decode: Callable[[Any], R] | None,
               raise_on_failure: bool = False) -> TaskResult[R]: ...


async def wait(task_id: str, timeout: float | None = None, *,
               decode: Callable[[Any], Any] | None = None,
               raise_on_failure: bool = False) -> TaskResult[Any]:
    """``await default_app().wait(task_id, timeout)``."""
    return await default_app().wait(task_id, timeout, decode=decode,
                                    raise_on_failure=raise_on_failure)


def wait_sync(task_id: str, timeout: float | None = None, *,
              raise_on_failure: bool = False) -> TaskResult[Any]:
    """``default_app().wait_sync(task_id, timeout)``: :func:`wait` for sync code."""
    return default_app().wait_sync(task_id, timeout, raise_on_failure=raise_on_failure)
