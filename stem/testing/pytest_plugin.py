"""pytest fixtures for testing code built on Stem; pytest loads them by itself.

Registered as the ``stem`` plugin (the ``pytest11`` entry point), so a project with Stem
installed has these fixtures without importing anything (``-p no:stem`` turns them off):

- ``stem_memory_url``: a ``memory://`` URL of this test alone (a fresh, empty broker and
  result backend, in this process);
- ``stem_app``: the app the other fixtures use. By default a new ``Stem`` on
  ``stem_memory_url``; override it in your ``conftest.py`` to test your own app::

      @pytest.fixture
      def stem_app(stem_app_factory):
          return stem_app_factory(my_project.tasks.app)

- ``stem_app_factory(app, eager=False, eager_propagates=False)``: points ``app`` (the
  same object: its tasks, routes and options) at ``stem_memory_url`` for this test, in
  eager mode if asked (:func:`stem.testing.eager`); undone at teardown;
- ``stem_worker``: a real :class:`~stem.worker.Worker` for ``stem_app`` running in the
  test's event loop (needs pytest-asyncio), stopped at teardown, so an enqueued task
  runs as in production and ``await app.wait(task_id, timeout=...)`` gets its result.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from stem.app import Stem
from stem.testing._modes import eager, memory_url, use_memory

if TYPE_CHECKING:
    from stem.worker import Worker

try:
    import pytest_asyncio
except ImportError:  # stem_worker then says what to install
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True


class StemAppFactory(Protocol):
    """The ``stem_app_factory`` fixture: puts an app on this test's memory store."""

    def __call__(self, app: Stem, *, eager: bool = False,
                 eager_propagates: bool = False) -> Stem:
        """Point ``app`` at ``stem_memory_url`` (eager if asked) until the test ends."""
        ...


@pytest.fixture
def stem_memory_url() -> str:
    """A ``memory://`` URL of this test alone: an empty in-process broker and backend."""
    return memory_url()


@pytest.fixture
def stem_app_factory(stem_memory_url: str) -> Iterator[StemAppFactory]:
    """Rebind an existing app (yours) to ``stem_memory_url`` for this test."""
    with ExitStack() as stack:

        def factory(app: Stem, *, eager: bool = False, eager_propagates: bool = False) -> Stem:
            stack.enter_context(use_memory(app, stem_memory_url))
            if eager or eager_propagates:
                stack.enter_context(_eager(app, propagate=eager_propagates))
            return app

        yield factory


_eager = eager  # the factory's keyword argument shadows the name


@pytest.fixture
def stem_app(stem_memory_url: str) -> Stem:
    """A new app on ``stem_memory_url``; override this fixture to use your own app."""
    return Stem("stem-test", broker=stem_memory_url, backend=stem_memory_url)


if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def stem_worker(stem_app: Stem) -> AsyncIterator[Worker]:
        """A Worker for ``stem_app`` running in this test's event loop until teardown."""
        from stem.worker import Worker  # the worker loads only for tests that use it

        worker = Worker(stem_app, block_time=0.1, shutdown_grace=5.0)
        running = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)  # a worker that crashed fails the test here

else:

    @pytest.fixture
    def stem_worker() -> Any:
        """Needs pytest-asyncio (the worker runs in the test's event loop)."""
        pytest.fail("the stem_worker fixture needs pytest-asyncio: pip install pytest-asyncio")


__all__ = ["StemAppFactory", "stem_app", "stem_app_factory", "stem_memory_url", "stem_worker"]

