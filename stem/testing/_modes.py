"""Switching an existing app into test modes: eager runs, and a fresh memory store."""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from stem.adapters.memory import MemoryStore

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.testing._eager import EagerRunner


class eager:  # lower case: used like a function, ``with stem.testing.eager(app):``
    """Run ``app``'s tasks in this process at enqueue for the duration of a block.

    ``with eager(app):`` or ``async with eager(app):`` (the same thing; the async form
    also suits async fixtures). Inside, ``enqueue`` (and ``delay``, ``enqueue_many``,
    child enqueues) runs the task through the worker's pipeline before it returns the
    id, and stores the result in the app's backend, so ``await app.wait(id)`` returns it
    at once. ``propagate=True`` makes an enqueue of a failing task raise the task's
    exception (Celery's ``task_eager_propagates``). The previous mode is restored on
    exit, so blocks nest. Same as ``Stem(..., eager=True)`` for one block.
    """

    def __init__(self, app: Stem, *, propagate: bool = False) -> None:
        self.app = app
        self.propagate = propagate
        self._saved: list[EagerRunner | None] = []
        self._runner: EagerRunner | None = None

    def __enter__(self) -> Stem:
        from stem.testing._eager import EagerRunner

        self._saved.append(self.app._eager)
        self._runner = EagerRunner(self.app, propagate=self.propagate)
        self.app._eager = self._runner
        return self.app

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.app._eager = self._saved.pop()
        if self._runner is not None:
            self._runner.close()

    async def __aenter__(self) -> Stem:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, tb)


#: The app attributes that say where its broker and backend are, swapped by use_memory.
_BINDING = ("broker_url", "backend_url", "_given_broker", "_given_backend",
            "_given_broker_store", "_given_backend_store", "_loops", "_unbound", "_last")


def memory_url() -> str:
    """A ``memory://`` URL no other caller gets: a fresh, empty broker and backend."""
    return f"memory://t{uuid.uuid4().hex[:16]}"


@contextmanager
def use_memory(app: Stem, url: str | None = None) -> Iterator[str]:
    """Point ``app``'s broker and result backend at ``url`` (default: a fresh
    ``memory://`` one, :func:`memory_url`) for the block; yields the URL.

    For tests of an app built elsewhere (your ``tasks.py``): the same object, its tasks
    and routes, on an in-process store. Connections the app opened before are kept
    aside and used again after the block; what the block opened is dropped with it.
    """
    from stem.app import _LoopParts

    url = url or memory_url()
    MemoryStore(url, namespace=app.namespace)  # refuse a bad URL before changing anything
    saved: dict[str, Any] = {k: getattr(app, k) for k in _BINDING}
    with app._lock:
        app.broker_url = app.backend_url = url
        app._given_broker = app._given_backend = None
        app._given_broker_store = app._given_backend_store = None
        app._loops = weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopParts]()
        app._unbound = None
        app._last = (object(), _LoopParts(app))
    try:
        yield url
    finally:
        with app._lock:
            for k, v in saved.items():
                setattr(app, k, v)
