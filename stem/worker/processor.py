"""Envelope → outcome, touching no broker: validate, decode, run, classify.

The delivery loop (worker.py) maps each outcome to broker and backend actions, so
this half is testable on its own and shared by every execution mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from stem._time import to_epoch, utcnow
from stem.encoding import ARGS_ENCODER_HEADER, ARGS_ENCODER_META
from stem.envelope import MAX_ATTEMPTS, Envelope
from stem.errors import PayloadEncodingError, TaskArgumentError, UnknownTaskError
from stem.retry import ExponentialJitterRetryStrategy, Retry, RetryStrategy, clamp_delay
from stem.status import TaskError
from stem.task import META_MAX_RETRIES, META_SOFT_TIME_LIMIT, META_TIME_LIMIT, TaskDefinition

if TYPE_CHECKING:
    from stem.app import Stem


@dataclass(slots=True)
class Prepared:
    """A validated envelope ready to run: its definition and decoded call arguments."""

    envelope: Envelope
    definition: TaskDefinition[Any, Any]
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(slots=True)
class Rejected:
    """Bad input (unknown task, undecodable or ill-fitting args): dead-letter it."""

    reason: str
    error_type: str


@dataclass(slots=True)
class Success:
    """The handler returned; ``payload`` is the encoded result."""

    payload: Any
    encoder_id: str


@dataclass(slots=True)
class RetryLater:
    """The attempt failed with budget left: publish ``next_envelope`` (attempt + 1)."""

    next_envelope: Envelope
    error: TaskError
    delay: float


@dataclass(slots=True)
class Failure:
    """The task failed for good."""

    error: TaskError


Outcome = Success | RetryLater | Failure | Rejected


@dataclass(slots=True)
class EncodedResult:
    """A handler's return value already encoded elsewhere (a process-pool child).

    :meth:`Processor.success` stores it as is, so results are encoded once, where
    the handler ran.
    """

    payload: Any
    encoder_id: str


class RemoteError(Exception):
    """An exception raised by a handler in another process, carried as its TaskError.

    Exceptions never cross the process boundary as objects; the child sends the
    type name, message and stack, and the stored error shows them unchanged.
    """

    def __init__(self, error: TaskError) -> None:
        super().__init__(f"{error.type}: {error.message}")
        self.error = error


#: The longest time limit an envelope may carry in its meta (one year).
MAX_TIME_LIMIT = 365 * 86_400.0


def meta_problem(meta: dict[str, Any]) -> str | None:
    """Why the per-call overrides in an envelope's meta are unusable, or None.

    ``__stemMaxRetries`` must be a whole number in ``0..MAX_ATTEMPTS``; ``timeLimit``
    and ``softTimeLimit`` numbers of seconds in ``(0, MAX_TIME_LIMIT]``.
    """
    budget = meta.get(META_MAX_RETRIES)
    if budget is not None and (type(budget) is not int or not 0 <= budget <= MAX_ATTEMPTS):
        return (f"meta {META_MAX_RETRIES!r} must be a whole number in 0..{MAX_ATTEMPTS}, "
                f"got {repr(budget)[:80]}")
    for key in (META_TIME_LIMIT, META_SOFT_TIME_LIMIT):
        limit = meta.get(key)
        if limit is not None and (type(limit) not in (int, float)
                                  or not 0 < limit <= MAX_TIME_LIMIT):
            return (f"meta {key!r} must be seconds in (0, {MAX_TIME_LIMIT:.0f}], "
                    f"got {repr(limit)[:80]}")
    return None


def effective_limits(envelope: Envelope, definition: TaskDefinition[Any, Any]
                     ) -> tuple[float | None, float | None]:
    """(soft, hard) time limits for this attempt: envelope meta wins over task options."""
    meta = envelope.meta
    hard = meta.get(META_TIME_LIMIT, definition.options.time_limit)
    soft = meta.get(META_SOFT_TIME_LIMIT, definition.options.soft_time_limit)
    return (None if soft is None else float(soft)), (None if hard is None else float(hard))


class Processor:
    """Turns envelopes into :class:`Prepared` work and exceptions into outcomes."""

    def __init__(self, app: Stem, retry_strategy: RetryStrategy | None = None) -> None:
        self.app = app
        self.retry_strategy = retry_strategy or ExponentialJitterRetryStrategy()

    def prepare(self, envelope: Envelope) -> Prepared | Rejected:
        """Resolve the handler and decode + check arguments, or say why not."""
        definition = self.app.tasks.get(envelope.name)
        if definition is None or definition.func is None:
            return Rejected(f"unknown task {envelope.name!r}: no handler registered in this "
                            "worker's app", UnknownTaskError.__name__)
        if envelope.meta:
            problem = meta_problem(envelope.meta)
            if problem is not None:
                return Rejected(f"invalid envelope: {problem}", "EnvelopeDecodeError")
        encoder_id = envelope.headers.get(ARGS_ENCODER_HEADER) or envelope.meta.get(
            ARGS_ENCODER_META
        )
        try:
            data = self.app.encoders.decode_args(
                envelope.args, encoder_id, definition.options.args_encoder
            )
            args, kwargs = definition.call_arguments(data)
        except PayloadEncodingError as exc:
            return Rejected(str(exc), "PayloadEncodingError")
        except TaskArgumentError as exc:
            return Rejected(f"bad arguments: {exc}", "TaskArgumentError")
        return Prepared(envelope, definition, args, kwargs)

    def success(self, prepared: Prepared, value: Any) -> Success | Failure:
        """Encode the handler's return value (once)."""
        if isinstance(value, EncodedResult):  # already encoded where it ran (process pool)
            return Success(value.payload, value.encoder_id)
        try:
            payload, encoder_id = self.app.encoders.encode_result(
                value, prepared.definition.options.result_encoder
            )
        except Exception as exc:
            return Failure(TaskError.from_exception(exc))
        return Success(payload, encoder_id)

    def failure(self, prepared: Prepared, exc: BaseException) -> RetryLater | Failure:
        """Classify an exception: retry with a delay while budget remains, else fail.

        The budget is at most ``MAX_ATTEMPTS`` and the delay is clamped by
        :func:`~stem.retry.clamp_delay`, so the next envelope is always one that decodes.
        """
        env = prepared.envelope
        explicit = env.meta.get(META_MAX_RETRIES)  # checked by prepare()
        budget = (
            int(explicit)
            if explicit is not None
            else max(env.max_retries, prepared.definition.options.max_retries)
        )
        delay: float | None = None
        cause: BaseException = exc
        next_meta = dict(env.meta)
        if isinstance(exc, Retry):
            if exc.max_retries is not None:
                budget = int(exc.max_retries)
            if exc.eta is not None:
                delay = clamp_delay(to_epoch(exc.eta) - to_epoch(utcnow()))
            elif exc.countdown is not None:
                delay = clamp_delay(exc.countdown)
            if exc.time_limit is not None:
                next_meta[META_TIME_LIMIT] = exc.time_limit
            if exc.soft_time_limit is not None:
                next_meta[META_SOFT_TIME_LIMIT] = exc.soft_time_limit
            cause = exc.exc or exc
        if env.attempt >= min(budget, MAX_ATTEMPTS):
            return Failure(_task_error(cause, retryable=False))
        if delay is None:
            strategy = prepared.definition.options.retry_strategy or self.retry_strategy
            delay = clamp_delay(strategy.next_delay(env.attempt, cause))
        now = utcnow()
        next_env = env.copy(
            attempt=env.attempt + 1,
            not_before=now + timedelta(seconds=delay),
            meta=next_meta,
            max_retries=min(budget, MAX_ATTEMPTS),
        )
        return RetryLater(next_env, _task_error(cause, retryable=True), delay)


def _task_error(exc: BaseException, *, retryable: bool) -> TaskError:
    if isinstance(exc, RemoteError):  # keep the type, message and stack from the child
        return replace(exc.error, retryable=retryable)
    return TaskError.from_exception(exc, retryable=retryable)
