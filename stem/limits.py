"""Bounds on envelope fields, in one place: every adapter and the worker apply these.

A value outside a bound is either clamped (priority: documented, as the Dart Stem
clamps) or refused (visibility timeout, payload size) — never stored as-is, because
an out-of-range number in storage is what wedges a queue (an interval overflow in a
lease statement, a lease keeper spinning on a non-positive timeout).
"""

from __future__ import annotations

import os

from stem.errors import ConfigurationError

#: Priorities run 0 (lowest, the default) to 9; anything outside is clamped into it.
PRIORITY_MIN = 0
PRIORITY_MAX = 9

#: Leases shorter than this are refused: the lease keeper renews at half-life and a
#: shorter lease would make it spin.
MIN_VISIBILITY_TIMEOUT = 0.1
#: Leases longer than a week are refused (a long task renews its lease by heartbeat).
MAX_VISIBILITY_TIMEOUT = 7 * 86_400.0

#: Envelopes larger than this are refused at enqueue and dead-lettered unparsed by the
#: worker. Override with ``STEM_MAX_PAYLOAD_BYTES``.
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


def clamp_priority(priority: int) -> int:
    """``priority`` forced into ``PRIORITY_MIN..PRIORITY_MAX`` (the one rule for all stores)."""
    if priority < PRIORITY_MIN:
        return PRIORITY_MIN
    if priority > PRIORITY_MAX:
        return PRIORITY_MAX
    return priority


def visibility_timeout_problem(seconds: float) -> str | None:
    """Why ``seconds`` is not a usable lease length, or None when it is."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return f"visibility timeout must be a number of seconds, got {type(seconds).__name__}"
    if not (MIN_VISIBILITY_TIMEOUT <= seconds <= MAX_VISIBILITY_TIMEOUT):  # NaN fails too
        return (f"visibility timeout {seconds!r} s is outside "
                f"{MIN_VISIBILITY_TIMEOUT}..{MAX_VISIBILITY_TIMEOUT:.0f} s")
    return None


def check_visibility_timeout(seconds: float) -> float:
    """Return ``seconds`` as a float, or raise ConfigurationError saying the allowed range."""
    problem = visibility_timeout_problem(seconds)
    if problem is not None:
        raise ConfigurationError(problem)
    return float(seconds)


def max_payload_bytes(env: dict[str, str] | None = None) -> int:
    """The payload cap: ``STEM_MAX_PAYLOAD_BYTES`` when set (a positive integer), else 16 MiB."""
    raw = (os.environ if env is None else env).get("STEM_MAX_PAYLOAD_BYTES")
    if not raw:
        return DEFAULT_MAX_PAYLOAD_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigurationError(
            f"STEM_MAX_PAYLOAD_BYTES must be a positive number of bytes, got {raw!r}")
    return value


#: First-generation garbage-collector threshold ``stem worker start`` sets unless told
#: (``--gc-threshold`` / ``STEM_GC_THRESHOLD``; 0 keeps Python's own settings; see
#: :mod:`stem.worker.gctune`).
DEFAULT_GC_THRESHOLD = 10_000

#: The largest threshold accepted (a bigger one only delays freeing cycles).
MAX_GC_THRESHOLD = 1_000_000
