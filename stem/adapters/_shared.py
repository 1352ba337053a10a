"""Small mechanisms several adapters need; adapter-neutral, so adapters may import it
without importing each other."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

#: Every FAIR_EVERY-th multi-queue fetch starts at a later queue, so a busy first
#: queue delays the others but never starves them.
FAIR_EVERY = 4


class FairOrder:
    """The order to serve ``queues`` in on each fetch: mostly as given, sometimes rotated."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def __call__(self, queues: Sequence[str]) -> list[str]:
        order = list(dict.fromkeys(queues))
        if len(order) > 1:
            self._turn += 1
            if self._turn % FAIR_EVERY == 0:
                start = 1 + (self._turn // FAIR_EVERY) % (len(order) - 1)
                order = order[start:] + order[:start]
        return order


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiter:
    """A one-shot wake-up armed on the running loop; :meth:`wake` is safe from any thread.

    Stores that outlive one event loop (the memory adapter, shared by a test loop
    and the sync facade's loop) never keep a loop-bound ``asyncio.Event``: each
    waiting coroutine arms its own future, and whoever changes the data wakes it.
    """

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
