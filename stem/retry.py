"""Retry policy: how long to wait before attempt N+1, and explicit retries from handlers."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from stem.errors import ConfigurationError, StemError

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


def _ceiling(base: float, attempt: int, cap: float) -> float:
    """``min(cap, base * 2**attempt)`` for any attempt (no float overflow)."""
    if attempt >= _MAX_DOUBLINGS:
        return cap
    return min(cap, base * (2.0 ** max(attempt, 0)))


def dart_jitter(capped: float) -> float:
    """``capped`` minus a random part of up to a quarter of it: 75-100 % of ``capped``.

    The Dart Stem's jitter (``capped - randInt(0 .. capped ~/ 4)``, in milliseconds),
    so a retry waits close to its backoff ceiling but a burst still spreads out.
    """
    if not capped > 0 or math.isinf(capped):
        return capped
    ms = int(capped * 1000)
    return (ms - random.randint(0, ms // 4)) / 1000.0


@dataclass(frozen=True, slots=True)
class ExponentialJitterRetryStrategy:
    """Exponential backoff with jitter, the default: ``base * 2**attempt`` capped at
    ``max_delay``, then jittered.

    ``jitter=True`` (the default, as in the Dart Stem) waits 75-100 % of that ceiling
    (:func:`dart_jitter`); ``jitter="full"`` waits ``uniform(0, ceiling)`` ("full
    jitter", which spreads a stampede widest but halves the mean delay);
    ``jitter=False`` waits exactly the ceiling.
    """

    base: float = 2.0
    max_delay: float = 300.0
    jitter: bool | Literal["full"] = True

    def next_delay(self, attempt: int, error: BaseException | None) -> float:
        """Delay in seconds before the attempt after ``attempt`` (any attempt number)."""
        ceiling = _ceiling(self.base, attempt, self.max_delay)
        if self.jitter == "full":
            return random.uniform(0, ceiling)
        return dart_jitter(ceiling) if self.jitter else ceiling


def exception_names(exc: BaseException) -> set[str]:
    """The names an exception answers to in a retry filter: its class's and every base
    class's ``__name__`` (``ConnectionError`` also matches ``"OSError"``).

    An error raised in a process-pool child carries the names its child sent.
    """
    names: Iterable[str] | None = getattr(exc, "stem_type_names", None)
    if names is not None:
        return set(names)
    return {c.__name__ for c in type(exc).__mro__}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The Dart Stem's ``TaskRetryPolicy``: how often and how soon a task is retried,
    and which errors are retried at all.

    Give it to a task (``@app.task(retry_policy=...)``) or to one call
    (``.with_options(retry_policy=...)``); it travels in the envelope's meta as
    ``stem.retryPolicy`` (a call's policy wins over the task's), so a Dart worker
    honours it too. With a policy the retry budget is ``max_retries`` (None: the
    envelope's), and the delay before retry N+1 (attempt N failed) is
    ``default_delay`` when ``backoff`` is False, else ``default_delay * 2**N`` capped at
    ``backoff_max``; ``jitter`` then takes up to a quarter of it off
    (:func:`dart_jitter`). Times are seconds.

    ``auto_retry_for`` / ``dont_auto_retry_for`` are exception class *names*: an error
    is retried only when one of its names (:func:`exception_names`) is in
    ``auto_retry_for`` (empty: every error) and none is in ``dont_auto_retry_for``
    (the deny list wins).
    """

    max_retries: int | None = None
    default_delay: float = 0.0
    backoff: bool = False
    backoff_max: float | None = None
    jitter: bool = False
    auto_retry_for: tuple[str, ...] = ()
    dont_auto_retry_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_retries is not None and (type(self.max_retries) is not int
                                             or not 0 <= self.max_retries <= 1_000_000):
            raise ConfigurationError(
                f"retry_policy max_retries must be a whole number in 0..1000000, "
                f"got {self.max_retries!r}")
        for name, value in (("default_delay", self.default_delay),
                            ("backoff_max", self.backoff_max)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)
                                      or not 0 <= value <= MAX_RETRY_DELAY):
                raise ConfigurationError(
                    f"retry_policy {name} must be seconds in 0..{MAX_RETRY_DELAY:.0f}, "
                    f"got {value!r}")
        for name, names in (("auto_retry_for", self.auto_retry_for),
                            ("dont_auto_retry_for", self.dont_auto_retry_for)):
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ConfigurationError(
                    f"retry_policy {name} must be a sequence of exception class names, "
                    f"got {names!r}")
            object.__setattr__(self, name, tuple(names))

    def retries(self, exc: BaseException) -> bool:
        """Whether this policy's filters let ``exc`` be retried."""
        names = exception_names(exc)
        if self.dont_auto_retry_for and names.intersection(self.dont_auto_retry_for):
            return False
        return not self.auto_retry_for or bool(names.intersection(self.auto_retry_for))

    def next_delay(self, attempt: int, error: BaseException | None = None) -> float:
        """Seconds before the attempt after ``attempt`` (the Dart formula, see the class)."""
        base = float(self.default_delay)
        if not self.backoff:
            delay = base
        else:
            cap = MAX_RETRY_DELAY if self.backoff_max is None else float(self.backoff_max)
            delay = _ceiling(base, attempt, cap)
        return dart_jitter(delay) if self.jitter else delay

    def to_meta(self) -> dict[str, Any]:
        """The ``stem.retryPolicy`` meta value (the Dart Stem's JSON, times in ms)."""
        out: dict[str, Any] = {
            "backoff": self.backoff,
            "jitter": self.jitter,
            "defaultDelayMs": round(self.default_delay * 1000),
        }
        if self.backoff_max is not None:
            out["backoffMaxMs"] = round(self.backoff_max * 1000)
        if self.max_retries is not None:
            out["maxRetries"] = self.max_retries
        if self.auto_retry_for:
            out["autoRetryFor"] = list(self.auto_retry_for)
        if self.dont_auto_retry_for:
            out["dontAutoRetryFor"] = list(self.dont_auto_retry_for)
        return out

    @classmethod
    def from_meta(cls, data: Any) -> RetryPolicy:
        """Read a ``stem.retryPolicy`` meta value; ValueError saying what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"must be a JSON object, got {repr(data)[:80]}")

        def ms(key: str) -> float | None:
            value = data.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= MAX_RETRY_DELAY * 1000:
                raise ValueError(f"{key!r} must be milliseconds >= 0, got {repr(value)[:80]}")
            return value / 1000.0

        def names(key: str) -> tuple[str, ...]:
            value = data.get(key)
            if value is None:
                return ()
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise ValueError(f"{key!r} must be a list of type names, got {repr(value)[:80]}")
            return tuple(value)

        budget = data.get("maxRetries")
        if budget is not None and (type(budget) is not int or not 0 <= budget <= 1_000_000):
            raise ValueError(f"'maxRetries' must be a whole number in 0..1000000, "
                             f"got {repr(budget)[:80]}")
        return cls(
            max_retries=budget,
            default_delay=ms("defaultDelayMs") or 0.0,
            backoff=data.get("backoff") is True,
            backoff_max=ms("backoffMaxMs"),
            jitter=data.get("jitter") is True,
            auto_retry_for=names("autoRetryFor"),
            dont_auto_retry_for=names("dontAutoRetryFor"),
        )


class NonRetryableError(StemError):
    """Raise (or subclass) for a failure that retrying cannot fix: the task fails at
    once, whatever its retry budget, and is acked (not dead-lettered).

    Any exception class can declare the same without subclassing this one, by setting
    the class attribute ``stem_retryable = False`` (see :func:`is_retryable`).
    """

    stem_retryable = False


class Reject(NonRetryableError):
    """Raise from a handler to fail the task now, without a retry:
    ``raise stem.Reject("customer deleted")``.

    ``dead_letter=False`` (the default) stores the task ``failed`` and acks it;
    ``dead_letter=True`` also moves the message to its queue's dead letters with
    ``reason`` (``stem dlq list``), so it can be replayed once whatever was wrong is
    fixed.
    """

    def __init__(self, reason: str = "rejected", *, dead_letter: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason or "rejected"
        self.dead_letter = dead_letter


def is_retryable(exc: BaseException) -> bool:
    """False when ``exc`` declares itself not worth retrying: its class (or a base
    class) sets ``stem_retryable = False``, as :class:`NonRetryableError` and
    :class:`Reject` do."""
    return getattr(exc, "stem_retryable", True) is not False


class Retry(StemError):
    """Raise from a handler to retry now-ish: ``raise stem.Retry(countdown=5, exc=err)``.

    ``countdown`` (seconds) or ``eta`` override the strategy's delay; ``max_retries``
    overrides the task's budget for this decision; ``time_limit`` and
    ``soft_time_limit`` apply to the next attempt, as does ``retry_policy`` (a
    :class:`RetryPolicy`, for the retries after it). An explicit Retry is never
    filtered out by ``autoretry_for`` or a policy's lists. When the budget is spent the
    task fails with ``exc`` (or this Retry) as its error and is dead-lettered
    (``max-retries-exhausted``), like any task that ran out of retries.
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
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(message or (f"retry requested: {exc!r}" if exc else "retry requested"))
        self.retry_policy = retry_policy
        self.countdown = countdown
        self.eta = eta
        self.exc = exc
        self.max_retries = max_retries
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
