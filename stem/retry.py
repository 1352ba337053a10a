"""Retry policy: how long to wait before attempt N+1, and explicit retries from handlers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from stem.errors import StemError


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
        """Delay in seconds before the attempt after ``attempt``."""
        ceiling = min(self.max_delay, self.base * (2 ** max(attempt, 0)))
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
