"""The event loop behind the sync producer API: one anyio blocking portal per app.

``app.enqueue_sync``, ``task.delay`` and friends run the async call on a background
event-loop thread that the app starts on first use (``anyio.from_thread.
start_blocking_portal``), so plain functions, scripts, WSGI views and many threads at
once can enqueue. The portal's loop has its own connections (the app keeps its stores
per event loop). At interpreter exit the app's stores on that loop are closed and the
thread stopped; a forked child starts a portal of its own on first use (the parent's
thread does not exist there, and its connections are never touched).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, TypeVar

from stem.errors import SyncCallInLoopError

if TYPE_CHECKING:  # anyio is imported by the first sync call, not by every process
    from anyio.from_thread import BlockingPortal

T = TypeVar("T")

#: How long closing the stores may take at interpreter exit or in close_sync().
CLOSE_TIMEOUT = 5.0


def refuse_in_event_loop(what: str, instead: str) -> None:
    """Raise SyncCallInLoopError if this thread is running an event loop.

    A blocking call there would stall that loop (or deadlock, waiting for work the
    loop itself must do), so the caller is told which ``await`` to use instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise SyncCallInLoopError(
        f"{what} blocks until it is done, and it was called from a running event loop "
        f"(async code); use `await {instead}` there instead")


class SyncBridge:
    """Runs coroutines for sync callers on the app's background event loop."""

    def __init__(self, close_loop: Callable[[], Awaitable[None]]) -> None:
        # close_loop closes what the app built on the current loop (run on the portal's).
        self._close_loop = close_loop
        self._lock = threading.Lock()
        self._pid = 0
        self._cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        # A forked child's copies of the parent's portal: kept, never used or closed.
        self._inherited: list[object] = []
        self._atexit_registered = False

    @property
    def running(self) -> bool:
        """Whether this process has a portal thread running for the app."""
        return self._portal is not None and self._pid == os.getpid()

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on the portal's loop and return its result (the caller blocks)."""
        portal = self._portal
        if portal is None or self._pid != os.getpid():
            portal = self._start()
        return portal.call(fn)

    def _start(self) -> BlockingPortal:
        with self._lock:
            pid = os.getpid()
            if self._portal is not None and self._pid == pid:
                return self._portal
            if self._portal is not None:  # forked: that portal's thread is the parent's
                self._inherited.append((self._cm, self._portal))
                self._cm = self._portal = None
            from anyio.from_thread import start_blocking_portal

            cm = start_blocking_portal()
            portal = cm.__enter__()
            self._cm, self._portal, self._pid = cm, portal, pid
            if not self._atexit_registered:
                atexit.register(_close_at_exit, weakref.ref(self))
                self._atexit_registered = True
            return portal

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the app's stores on the portal's loop, then stop its thread.

        A later sync call starts a new portal. Does nothing when none runs here.
        """
        with self._lock:
            cm, portal = self._cm, self._portal
            if cm is None or portal is None or self._pid != os.getpid():
                return
            self._cm = self._portal = None
        try:
            portal.call(_bounded, self._close_loop, timeout)
        finally:
            cm.__exit__(None, None, None)

    def after_fork_in_child(self) -> None:
        """A lock held by another thread at fork time would never be released here."""
        self._lock = threading.Lock()


async def _bounded(fn: Callable[[], Awaitable[None]], timeout: float) -> None:
    await asyncio.wait_for(fn(), timeout)


def _close_at_exit(ref: weakref.ref[SyncBridge]) -> None:
    bridge = ref()
    if bridge is None:
        return
    try:
        bridge.close()
    except Exception:
        pass
