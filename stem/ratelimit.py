"""Rate limits: the ``"10/s"`` syntax and the GCRA arithmetic every limiter shares.

A limit of ``N`` per period ``P`` is enforced with the generic cell rate algorithm
(GCRA, a token bucket of ``N`` tokens refilled at ``N`` per ``P``): one number per key,
the *theoretical arrival time* ``tat``. Each admitted request moves it on by the
emission interval ``T = P / N``; a request is admitted when ``max(tat, now) + T - P <=
now``. So after a quiet period up to ``N`` requests pass at once (the burst), and then
one every ``T`` seconds: over any stretch of time ``t`` at most ``N + t / T`` pass, the
long-run rate is exactly ``N / P``, and there are no window edges where a fixed-window
counter lets ``2N`` through in a moment. It takes one key per limit, updated in one
atomic step in each store (a Lua script on Redis, one statement on Postgres, one
``BEGIN IMMEDIATE`` transaction on SQLite).

A request may also *reserve* a slot: with ``max_wait > 0`` a request that would
have to wait at most that long is counted now and told how long to wait
(``RateLimitDecision.reserved``). The worker uses that to re-schedule each denied
delivery at its own slot, so denied deliveries come back spread over time, one per
emission interval, instead of all at once when the window opens.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from stem.errors import ConfigurationError
from stem.ports import RateLimitDecision

__all__ = ["Rate", "decisions", "gcra", "gcra_many", "granted_count", "parse_rate"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([smh])\s*")
#: A wait this small is no wait (clock arithmetic in floats and microseconds).
EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class Rate:
    """``tokens`` requests per ``period`` seconds."""

    tokens: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two requests at the steady rate (the emission interval)."""
        return self.period / self.tokens

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.period]
        return f"{self.tokens}/{unit}"


@functools.lru_cache(maxsize=1024)
def parse_rate(text: str) -> Rate:
    """Parse ``"<count>/<s|m|h>"`` (``"10/s"``, ``"100/m"``, ``"500/h"``); the count is a
    whole number >= 1. Anything else is a ConfigurationError."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigurationError(
            f"rate limit {text!r} is not '<count>/<unit>' with a whole count >= 1 and a "
            "unit of s, m or h (e.g. '10/s', '100/m', '500/h')")
    return Rate(int(match.group(1)), _UNITS[match.group(2)])


def gcra(tat: float | None, now: float, limit: int, period: float, max_wait: float = 0.0
         ) -> tuple[float | None, RateLimitDecision]:
    """One GCRA step: ``(new tat or None when unchanged, decision)`` (see :func:`gcra_many`)."""
    new_tat, decisions = gcra_many(tat, now, limit, period, 1, max_wait)
    return new_tat, decisions[0]


def gcra_many(tat: float | None, now: float, limit: int, period: float, count: int,
              max_wait: float = 0.0) -> tuple[float | None, list[RateLimitDecision]]:
    """``count`` GCRA steps on one key at one instant: ``(new tat or None when unchanged,
    one decision per request, in order)``.

    ``tat`` is the stored theoretical arrival time (None: no state), ``now`` the
    store's clock; times in seconds. The requests are admitted (or reserved) in order
    while a slot lies within ``max_wait``; the rest are denied, all told to ask again
    when the first of them could succeed. The memory and SQLite limiters call this; the
    Redis script and the Postgres statement do the same arithmetic in the store
    (:func:`decisions`).
    """
    interval = period / limit
    start = now if tat is None or tat < now else tat
    taken = granted_count(start - now, interval, period + max_wait, count)
    return (start + taken * interval if taken else None,
            decisions(start - now, interval, period, max_wait, taken, count))


def granted_count(start_in: float, interval: float, reach: float, count: int) -> int:
    """How many of ``count`` requests get a slot: those whose slot ``start_in + i *
    interval`` (seconds from now, i = 1..) is at most ``reach`` (period + max_wait) away."""
    return max(0, min(count, int((reach - start_in) / interval + EPSILON)))


def decisions(start_in: float, interval: float, period: float, max_wait: float, taken: int,
              count: int) -> list[RateLimitDecision]:
    """The decisions of ``count`` requests of which the first ``taken`` got the slots
    after ``start_in`` (seconds from now of ``max(tat, now)`` before they came)."""
    out: list[RateLimitDecision] = []
    for i in range(1, taken + 1):
        wait = start_in + i * interval - period
        out.append(RateLimitDecision(True) if wait <= EPSILON
                   else RateLimitDecision(False, wait, reserved=True))
    if taken < count:
        again = max(start_in + (taken + 1) * interval - period - max_wait, EPSILON)
        out.extend([RateLimitDecision(False, again)] * (count - taken))
    return out
