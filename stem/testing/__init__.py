"""Helpers for testing code built on Stem, and Stem adapters.

For your tasks (see docs/testing.md): :func:`eager` (tasks run in-process at enqueue,
through the worker's pipeline), :func:`make_context` (a TaskContext for calling a
handler in a unit test), :func:`use_memory` (your app on a fresh in-process store) and
the pytest plugin :mod:`stem.testing.pytest_plugin` (fixtures ``stem_app``,
``stem_app_factory``, ``stem_memory_url``, ``stem_worker``), which pytest loads by
itself once Stem is installed.

:mod:`stem.testing.conformance` holds the conformance suite an adapter runs to show it
keeps the contracts of :mod:`stem.ports` (it needs pytest and pytest-asyncio; this
module itself needs neither, and ``import stem`` never imports it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from stem.testing._context import ContextRecorder, RecordingContext, make_context
from stem.testing._modes import eager, memory_url, use_memory

__all__ = [
    "ContextRecorder",
    "RecordingContext",
    "eager",
    "eventually",
    "make_context",
    "memory_url",
    "use_memory",
]

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Await ``check()`` until it returns a truthy value (returned) or ``timeout``
    seconds pass (AssertionError): poll with a deadline instead of sleeping."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
