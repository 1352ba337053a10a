"""A one-shot wake-up that can be fired from any thread.

Memory stores live for the whole process and may be shared by several event loops
(a test loop, the sync facade's loop in another thread), so they never keep a
loop-bound primitive such as ``asyncio.Event``: each waiting coroutine arms its own
future on its own loop, and whoever changes the data wakes it.
"""

from __future__ import annotations

import asyncio
import threading


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiter:
    """A future armed on the running loop; :meth:`wake` is safe from any thread."""

    __slots__ = ("_fut", "_thread")

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._thread = threading.get_ident()

    def wake(self) -> None:
        """Resolve the future (a no-op if already woken or its loop is gone)."""
        try:
            if threading.get_ident() == self._thread:
                _resolve(self._fut)
            else:
                self._fut.get_loop().call_soon_threadsafe(_resolve, self._fut)
        except RuntimeError:
            # The waiter's loop was closed while it waited; nobody is left to wake.
            pass

    async def wait(self, seconds: float | None) -> bool:
        """Wait until woken or ``seconds`` pass (None: forever); True when woken."""
        if self._fut.done():
            return True
        if seconds is not None and seconds <= 0:
            return False
        # asyncio.wait never cancels the future, so a late wake() stays harmless.
        await asyncio.wait((self._fut,), timeout=seconds)
        return self._fut.done()
