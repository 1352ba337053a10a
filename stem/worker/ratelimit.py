"""Rate limits in the worker: admit a prepared delivery, or say when to run it instead.

:class:`RateGate` asks the app's :class:`~stem.ports.RateLimiter` (the broker's store,
or ``rate_limit_url``) before a rate-limited task starts: the group limit first, then
the task's own. A delivery over a limit is not run and not failed: the worker
re-publishes it as the same attempt, due later (no retry is used up), with status
``retried`` and meta ``rateLimited``/``retryAfterMs`` (``groupRateLimited``/``groupKey``
for a group limit), as the Dart Stem's worker does.

No busy loop, no thundering herd. A denied delivery *reserves* the next free slot of
its limit (up to :data:`RESERVE_HORIZON` seconds, or one period if longer, ahead) and
is re-scheduled at exactly that slot, carrying the reservation in its envelope meta
(:data:`META_RATE_SLOTS`); when it comes back it runs without asking again. So a
worker holding a hundred prefetched deliveries of a ``"10/s"`` task re-schedules each
once, to its own slot, 0.1 s apart, instead of retrying all of them when the window
opens. A delivery beyond the horizon reserves nothing and asks again after a delay
spread over the horizon. A reservation is honoured only near its slot (one emission
interval plus :data:`SLOT_GRACE` late at most): a delivery that comes back later (the
workers were busy) asks again, so late deliveries cannot bunch up into a burst.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from stem._aio import within
from stem._time import utcnow
from stem.envelope import Envelope
from stem.errors import ConfigurationError
from stem.log import get_logger
from stem.ports import RateLimitDecision, RateLimiter
from stem.ratelimit import Rate, parse_rate
from stem.task import META_RATE_LIMIT, TaskOptions
from stem.worker.processor import Prepared

log = get_logger(__name__)

#: Envelope meta: ``{limiter key: epoch seconds}`` of the slots reserved for this delivery.
META_RATE_SLOTS = "stem.rateLimitSlots"
#: Slots are reserved at most this many seconds ahead (or one period, if longer).
RESERVE_HORIZON = 60.0
#: A reserved slot is honoured up to one emission interval plus this many seconds late.
SLOT_GRACE = 0.25
#: Seconds one limiter call may take before it counts as the store being unreachable.
LIMITER_TIMEOUT = 2.0
#: After a failed limiter call, the next calls fail at once for this long (seconds).
OUTAGE_PAUSE = 1.0
#: With ``rate_limit_failure="closed"``, re-schedule after 1-2x this many seconds.
CLOSED_RETRY = 1.0


@dataclass(slots=True)
class Deferral:
    """Run ``envelope`` (the same attempt, due ``delay`` seconds from now) instead;
    ``meta`` is what the ``retried`` status adds to the task's meta."""

    envelope: Envelope
    delay: float
    meta: dict[str, Any]


def limits_of(options: TaskOptions, meta: dict[str, Any]) -> bool:
    """True when the task, or this call (``meta``), has a rate limit or a group rate limit."""
    return (options.rate_limit is not None or options.group_rate_limit is not None
            or META_RATE_LIMIT in meta)


def _task_rate(env: Envelope, options: TaskOptions) -> Rate | None:
    """The call's own rate (``stem.rateLimit``) if it has a usable one, else the task's."""
    override = env.meta.get(META_RATE_LIMIT)
    if override is not None:
        try:
            return parse_rate(override)
        except ConfigurationError:
            log.warning("rate_limiter.bad_call_rate", task=env.name, task_id=env.id,
                        rate=repr(override)[:80])
    return None if options.rate_limit is None else parse_rate(options.rate_limit)


def _limits(env: Envelope, options: TaskOptions) -> list[tuple[str, Rate, dict[str, Any]]]:
    """(limiter key, rate, status meta when denied) for each limit, group first."""
    out: list[tuple[str, Rate, dict[str, Any]]] = []
    if options.group_rate_limit is not None:
        header = options.group_rate_key_header
        group = options.group_rate_key or (
            env.headers.get(header) if header is not None else None) or "global"
        out.append((f"group:{group}", parse_rate(options.group_rate_limit),
                    {"groupRateLimited": True, "groupKey": group}))
    rate = _task_rate(env, options)
    if rate is not None:
        header = options.rate_limit_key_header
        tenant = (env.headers.get(header) if header is not None else None) or "global"
        out.append((f"task:{env.name}:{tenant}", rate, {}))
    return out


def horizon(rate: Rate) -> float:
    """How far ahead a slot of ``rate`` may be reserved (seconds)."""
    return max(rate.period, RESERVE_HORIZON)


class RateGate:
    """Admits rate-limited deliveries (see the module docstring).

    ``limiter()`` returns the limiter for the running loop (``app.rate_limiter``).
    While its store is unreachable a task's ``rate_limit_failure`` decides: ``"open"``
    runs it unlimited, ``"closed"`` re-schedules it; either way the outage is logged
    once (``rate_limiter.unavailable``) and its end once (``rate_limiter.recovered``).
    """

    def __init__(self, limiter: Callable[[], RateLimiter]) -> None:
        self._limiter = limiter
        self._down_until = 0.0  # monotonic; calls before it fail at once
        self._error: BaseException | None = None
        # Requests waiting for the next call, per (key, limit, period), and the keys
        # with a call under way: one call per key at a time, taking all that came.
        self._queued: dict[tuple[str, int, float], list[asyncio.Future[RateLimitDecision]]] = {}
        self._calling: set[tuple[str, int, float]] = set()
        self._calls: set[asyncio.Task[None]] = set()  # held, so none is collected mid-call
        #: Limiter calls made (for tests and the benchmark).
        self.calls = 0

    async def admit(self, prepared: Prepared) -> Deferral | None:
        """None to run ``prepared`` now (its envelope loses any reservation it carried),
        else the :class:`Deferral` to re-schedule it with."""
        env = prepared.envelope
        options = prepared.definition.options
        stored = env.meta.get(META_RATE_SLOTS)
        slots: dict[str, Any] = dict(stored) if isinstance(stored, dict) else {}
        for key, rate, denied_meta in _limits(env, options):
            if _holds_slot(slots.pop(key, None), rate):
                continue
            decision = await self._acquire(key, rate)
            if isinstance(decision, BaseException):
                if options.rate_limit_failure == "open":
                    continue
                delay = CLOSED_RETRY * random.uniform(1.0, 2.0)
                return _deferral(env, slots, delay, {
                    **denied_meta, "rateLimiterUnavailable": True, "failureMode": "closed",
                    "error": repr(decision)})
            if decision.allowed:
                continue
            if decision.reserved:
                delay = decision.retry_after
                slots[key] = time.time() + delay
            else:  # beyond the horizon: ask again later, spread so they don't come together
                delay = decision.retry_after + random.uniform(0.0, horizon(rate))
            return _deferral(env, slots, delay, denied_meta)
        if META_RATE_SLOTS in env.meta:
            # Used up: a retry of this attempt must ask the limiter again.
            meta = dict(env.meta)
            del meta[META_RATE_SLOTS]
            prepared.envelope = env.copy(meta=meta)
        return None

    async def _acquire(self, key: str, rate: Rate) -> RateLimitDecision | BaseException:
        """The limiter's decision, or the error that stands for "unreachable".

        Requests for one key made while a call for it is under way (or in the same
        loop tick) go together in its next call (``acquire_many``): a worker starting a
        hundred deliveries of a limited task makes one round trip, not a hundred, and
        holds one connection of the store's pool, not a hundred.
        """
        if self._error is not None and time.monotonic() < self._down_until:
            return self._error  # do not make every delivery wait for a dead store
        spec = (key, rate.tokens, rate.period)
        waiter: asyncio.Future[RateLimitDecision] = asyncio.get_running_loop().create_future()
        self._queued.setdefault(spec, []).append(waiter)
        if spec not in self._calling:
            self._calling.add(spec)
            task = asyncio.get_running_loop().create_task(self._call(spec, rate))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        try:
            return await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return exc

    async def _call(self, spec: tuple[str, int, float], rate: Rate) -> None:
        try:
            while waiters := self._queued.pop(spec, None):
                self.calls += 1
                try:
                    got = await within(
                        self._limiter().acquire_many(spec[0], rate.tokens, rate.period,
                                                     len(waiters), max_wait=horizon(rate)),
                        LIMITER_TIMEOUT)
                except Exception as exc:
                    if self._error is None:
                        log.error("rate_limiter.unavailable", error=repr(exc))
                    self._error = exc
                    self._down_until = time.monotonic() + OUTAGE_PAUSE
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    continue
                if self._error is not None:
                    log.info("rate_limiter.recovered")
                    self._error = None
                for w, decision in zip(waiters, got, strict=True):
                    if not w.done():  # a cancelled waiter's slot goes unused
                        w.set_result(decision)
        finally:
            self._calling.discard(spec)


def _holds_slot(slot: Any, rate: Rate) -> bool:
    """True when ``slot`` (epoch seconds) is a reservation usable now."""
    if type(slot) not in (int, float):
        return False
    late = time.time() - float(slot)
    # Early by a second at most (clocks of two hosts), late by one interval + grace.
    return -1.0 <= late <= rate.interval + SLOT_GRACE


def _deferral(env: Envelope, slots: dict[str, Any], delay: float, denied_meta: dict[str, Any]
              ) -> Deferral:
    meta = {k: v for k, v in env.meta.items() if k != META_RATE_SLOTS}
    status_meta = {**meta, "rateLimited": True, "retryAfterMs": round(delay * 1000),
                   **denied_meta}
    if slots:
        meta[META_RATE_SLOTS] = slots
    return Deferral(env.copy(not_before=utcnow() + timedelta(seconds=delay), meta=meta),
                    delay, status_meta)


