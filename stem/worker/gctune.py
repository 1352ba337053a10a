"""The garbage collector of a worker process (``stem worker start --gc-threshold``).

A worker allocates a few dozen short-lived containers per task (the decoded envelope,
its dicts, the context, the outcome, the status). With Python's default threshold of
700 the cyclic collector then runs every few tasks and each pass walks everything
allocated since the last: measured on a Redis no-op drain, 15-20 % of the worker's
CPU. A larger first-generation threshold makes the passes rare, and
:func:`gc.freeze` moves what start-up built (modules, the app, the task registry)
out of every future pass. Memory held by unreachable cycles is bounded by the
threshold: tens of thousands of small objects, a few MiB at most.

Only the CLI applies it: the process is the worker's. A ``Worker`` embedded in a
host application leaves the host's collector alone.
"""

from __future__ import annotations

import gc

from stem.limits import DEFAULT_GC_THRESHOLD, MAX_GC_THRESHOLD

__all__ = ["DEFAULT_GC_THRESHOLD", "MAX_GC_THRESHOLD", "tune_gc"]


def tune_gc(threshold: int = DEFAULT_GC_THRESHOLD) -> None:
    """Collect and freeze what start-up allocated, then set the first-generation
    threshold to ``threshold`` (0: leave the collector as Python configured it)."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)
