"""Retry policy: how long to wait before attempt N+1, and explicit retries from handlers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from stem.errors import StemError

#: The longest delay before a retry (one year): whatever a strategy, ``countdown`` or
#: ``eta`` asks for is clamped into ``0..MAX_RETRY_DELAY`` seconds (NaN counts as the
#: maximum), so a huge value can neither overflow a date nor wedge a worker.
MAX_RETRY_DELAY = 365 * 86_400.0

#: Past this many doublings the exponential ceiling is ``max_delay`` whatever the base
#: (``2.0 ** 1024`` no longer fits in a float).
_MAX_DOUBLINGS = 1000


def clamp_delay(seconds: float) -> float:
    """``seconds`` forced into ``0..MAX_RETRY_DELAY`` (a float; NaN becomes the maximum)."""
    seconds = float(seconds)
    if seconds > 0.0:
        return seconds if seconds <= MAX_RETRY_DELAY else MAX_RETRY_DELAY
    if seconds <= 0.0:
        return 0.0
    return MAX_RETRY_DELAY  # NaN


@runtime_checkable
class RetryStrategy(Protocol):
    """Chooses the delay before the next attempt; pass one to the worker to customise."""

    def next_delay(self, attempt: int, error: BaseException | None) -> float:
        """Seconds to wait before re-running a task whose 0-based ``attempt`` just failed."""
        ...


@dataclass(frozen=True, slots=True)
class ExponentialJitterRetryStrategy:
    """``uniform(0, min(max_delay, base * 2**attempt))`` — exponential backoff, full jitter.

    Full jitter spreads a burst of failures out so retries don't stampede the
    dependency that failed (the AWS "exponential backoff and jitter" result).
    """

    base: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True

    def next_delay(self, attempt: int, error: BaseException | None) -> float:
        """Delay in seconds before the attempt after ``attempt`` (any attempt number)."""
        if attempt >= _MAX_DOUBLINGS:
            ceiling = self.max_delay
        else:
            ceiling = min(self.max_delay, self.base * (2.0 ** max(attempt, 0)))
        return random.uniform(0, ceiling) if self.jitter else ceiling


class Retry(StemError):
    """Raise from a handler to retry now-ish: ``raise stem.Retry(countdown=5, exc=err)``.

    ``countdown`` (seconds) or ``eta`` override the strategy's delay; ``max_retries``
    overrides the task's budget for this decision; ``time_limit`` and
    ``soft_time_limit`` apply to the next attempt. When the budget is spent the task
    fails with ``exc`` (or this Retry) as its error.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> None:
        super().__init__(message or (f"retry requested: {exc!r}" if exc else "retry requested"))
        self.countdown = countdown
        self.eta = eta
        self.exc = exc
        self.max_retries = max_retries
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
