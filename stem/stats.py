"""Counters an app keeps about what its producers did (``app.stats``), for metrics to
export; reading them costs nothing, and they count in every process separately."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["AppStats"]


class AppStats:
    """``app.stats``: plain counters, safe to bump from any thread.

    ``deduplicated`` counts unique calls that found an equal task pending and got its id
    instead of publishing (see ``docs/producer.md``, "Unique tasks"), by task name:
    ``stem_tasks_deduplicated_total{task=...}`` in metrics, the Dart Stem's
    ``stem.tasks.deduplicated``.
    """

    __slots__ = ("_lock", "deduplicated")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.deduplicated: Counter[str] = Counter()

    def count_deduplicated(self, task: str, n: int = 1) -> None:
        """Add ``n`` deduplicated calls of ``task``."""
        with self._lock:
            self.deduplicated[task] += n
