"""Small asyncio helpers shared by the worker, beat and the adapters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; True if it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancel that arrives in the
    same loop iteration as the event (gh-86296), and a service loop that waits this way
    then never ends — a worker hung on stop when a revoke sync was woken just as it was
    cancelled. ``asyncio.timeout`` counts cancels, so the outer one always propagates.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def within(aw: Awaitable[T], timeout: float) -> T:
    """``await aw`` with a deadline (TimeoutError after ``timeout`` s), cancel-safe unlike
    ``asyncio.wait_for`` on 3.11 (see :func:`wait_event`)."""
    async with asyncio.timeout(timeout):
        return await aw


async def cancel_and_wait(*tasks: asyncio.Task[object] | None, retry_every: float = 0.5) -> None:
    """Cancel background ``tasks`` and wait until every one has ended.

    A cancel is repeated every ``retry_every`` seconds for a task still running: a driver
    may swallow one (a cancel that lands while redis-py reads a reply can be lost), and
    a service loop that lost its cancel would otherwise keep a stopping worker alive for
    good. Their results and exceptions are dropped: they were stopped on purpose.
    """
    pending = {t for t in tasks if t is not None and not t.done()}
    for t in pending:
        t.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=retry_every)
        for t in pending:
            t.cancel()
    for task in tasks:
        if task is not None and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
