"""Envelope → outcome, touching no broker: validate, decode, run, classify.

The delivery loop (worker.py) maps each outcome to broker and backend actions, so
this half is testable on its own and shared by every execution mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, overload

from stem._time import from_iso, to_epoch, utcnow
from stem.encoding import ARGS_ENCODER_HEADER, ARGS_ENCODER_META, JsonPayloadEncoder
from stem.envelope import MAX_ATTEMPTS, Envelope
from stem.errors import PayloadEncodingError, TaskArgumentError, UnknownTaskError
from stem.retry import (
    ExponentialJitterRetryStrategy,
    Reject,
    Retry,
    RetryPolicy,
    RetryStrategy,
    clamp_delay,
    is_retryable,
)
from stem.signing import PayloadSigner
from stem.status import TaskError
from stem.task import (
    META_EXPIRES_AT,
    META_IGNORE_RESULT,
    META_MAX_RETRIES,
    META_RETRY_POLICY,
    META_SOFT_TIME_LIMIT,
    META_SOFT_TIME_LIMIT_MS,
    META_TIME_LIMIT,
    META_TIME_LIMIT_MS,
    TaskDefinition,
    limit_ms,
)

if TYPE_CHECKING:
    from stem.app import Stem


@dataclass(slots=True)
class Prepared:
    """A validated envelope ready to run: its definition and decoded call arguments.

    ``expires_at`` is the envelope's deadline (``stem.expiresAt``), so the worker can
    check it again when the task leaves the prefetch buffer; ``ignore_result`` whether
    a success is stored without its value (:func:`ignore_result_flag`).
    """

    envelope: Envelope
    definition: TaskDefinition[Any, Any]
    args: list[Any]
    kwargs: dict[str, Any]
    expires_at: datetime | None = None
    ignore_result: bool = False

    @property
    def expired(self) -> bool:
        """True when the envelope's deadline has passed (it must not run)."""
        return self.expires_at is not None and utcnow() > self.expires_at


@dataclass(slots=True)
class Expired:
    """The envelope's deadline (``stem.expiresAt``) passed before it ran: cancel and ack it."""

    envelope: Envelope
    definition: TaskDefinition[Any, Any]
    expires_at: datetime


@dataclass(slots=True)
class Rejected:
    """Bad input (unknown task, undecodable or ill-fitting args): dead-letter it."""

    reason: str
    error_type: str
    #: Extra status meta and stored-error meta (a refused signature names its key).
    meta: dict[str, Any] | None = None
    error_meta: dict[str, Any] | None = None


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


#: The dead-letter reason of a task that failed with no retry left (the Dart Stem's).
MAX_RETRIES_EXHAUSTED = "max-retries-exhausted"


@dataclass(slots=True)
class Failure:
    """The task failed for good.

    ``dead_letter`` is the reason to dead-letter the delivery with (its retry budget
    ran out, or the handler raised ``Reject(dead_letter=True)``); None: ack it.
    """

    error: TaskError
    dead_letter: str | None = None


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

    def __init__(self, error: TaskError, *, type_names: Sequence[str] | None = None,
                 retryable: bool = True, reject: str | None = None,
                 reject_dead_letter: bool = False) -> None:
        super().__init__(f"{error.type}: {error.message}")
        self.error = error
        #: What the retry filters match (:func:`stem.retry.exception_names`): the names
        #: of the original class and its bases, as the child sent them.
        self.stem_type_names = frozenset(type_names or (error.type,))
        #: False when the original declared itself not retryable (:func:`is_retryable`).
        self.stem_retryable = retryable
        #: The reason of a ``stem.Reject`` raised in the child, and its ``dead_letter``.
        self.reject = reject
        self.reject_dead_letter = reject_dead_letter


#: The longest time limit an envelope may carry in its meta (one year).
MAX_TIME_LIMIT = 365 * 86_400.0


def meta_problem(meta: dict[str, Any]) -> str | None:
    """Why the per-call overrides in an envelope's meta are unusable, or None.

    ``__stemMaxRetries`` must be a whole number in ``0..MAX_ATTEMPTS``;
    ``stem.timeLimitMs`` / ``stem.softTimeLimitMs`` milliseconds and the older
    ``timeLimit`` / ``softTimeLimit`` seconds in ``(0, MAX_TIME_LIMIT]``;
    ``stem.retryPolicy`` a policy :meth:`RetryPolicy.from_meta` reads;
    ``stem.expiresAt`` an ISO-8601 time (a deadline nobody can read would otherwise run
    the task whenever, or never).
    """
    deadline = meta.get(META_EXPIRES_AT)
    if deadline is not None:
        try:
            _deadline(deadline)
        except (TypeError, ValueError):
            return (f"meta {META_EXPIRES_AT!r} must be an ISO-8601 time, "
                    f"got {repr(deadline)[:80]}")
    budget = meta.get(META_MAX_RETRIES)
    if budget is not None and (type(budget) is not int or not 0 <= budget <= MAX_ATTEMPTS):
        return (f"meta {META_MAX_RETRIES!r} must be a whole number in 0..{MAX_ATTEMPTS}, "
                f"got {repr(budget)[:80]}")
    for key, scale, unit in ((META_TIME_LIMIT_MS, 1000, "milliseconds"),
                             (META_SOFT_TIME_LIMIT_MS, 1000, "milliseconds"),
                             (META_TIME_LIMIT, 1, "seconds"),
                             (META_SOFT_TIME_LIMIT, 1, "seconds")):
        limit = meta.get(key)
        if limit is not None and (type(limit) not in (int, float)
                                  or not 0 < limit <= MAX_TIME_LIMIT * scale):
            return (f"meta {key!r} must be {unit} in (0, {MAX_TIME_LIMIT * scale:.0f}], "
                    f"got {repr(limit)[:80]}")
    policy = meta.get(META_RETRY_POLICY)
    if policy is not None:
        try:
            RetryPolicy.from_meta(policy)
        except ValueError as exc:
            return f"meta {META_RETRY_POLICY!r}: {exc}"
    return None


#: The per-call keys :func:`meta_problem` checks and ``prepare`` reads: an envelope
#: whose meta has none of them (most: only the args encoder) skips every check.
_CALL_META_KEYS = frozenset({
    META_EXPIRES_AT, META_MAX_RETRIES, META_TIME_LIMIT_MS, META_SOFT_TIME_LIMIT_MS,
    META_TIME_LIMIT, META_SOFT_TIME_LIMIT, META_RETRY_POLICY, META_IGNORE_RESULT})
#: The keys of per-call time limits (:func:`effective_limits`).
_LIMIT_META_KEYS = frozenset({
    META_TIME_LIMIT_MS, META_SOFT_TIME_LIMIT_MS, META_TIME_LIMIT, META_SOFT_TIME_LIMIT})


def meta_limit(meta: dict[str, Any], ms_key: str, seconds_key: str) -> float | None:
    """A per-call limit in seconds from the meta: the Dart key (milliseconds) first,
    else the older key (seconds); None when neither is there."""
    ms = meta.get(ms_key)
    if ms is not None:
        return float(ms) / 1000.0
    seconds = meta.get(seconds_key)
    return None if seconds is None else float(seconds)


def _deadline(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return from_iso(value)


def ignore_result_flag(value: Any) -> bool:
    """Read ``stem.ignoreResult`` as the Dart Stem's producers may write it.

    True for ``true``, a number other than 0, and the strings ``"true"``, ``"1"`` and
    ``"yes"`` (any case); anything else is False.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return False


def effective_limits(envelope: Envelope, definition: TaskDefinition[Any, Any]
                     ) -> tuple[float | None, float | None]:
    """(soft, hard) time limits for this attempt: envelope meta wins over task options."""
    meta = envelope.meta
    options = definition.options
    if not meta or _LIMIT_META_KEYS.isdisjoint(meta):  # the common case: the task's own
        soft, hard = options.soft_time_limit, options.time_limit
        return (None if soft is None else float(soft)), (None if hard is None else float(hard))
    hard = meta_limit(meta, META_TIME_LIMIT_MS, META_TIME_LIMIT)
    soft = meta_limit(meta, META_SOFT_TIME_LIMIT_MS, META_SOFT_TIME_LIMIT)
    if hard is None:
        hard = definition.options.time_limit
    if soft is None:
        soft = definition.options.soft_time_limit
    return (None if soft is None else float(soft)), (None if hard is None else float(hard))


class Processor:
    """Turns envelopes into :class:`Prepared` work and exceptions into outcomes."""

    def __init__(self, app: Stem, retry_strategy: RetryStrategy | None = None) -> None:
        self.app = app
        self.retry_strategy = retry_strategy or ExponentialJitterRetryStrategy()

    @overload
    def prepare(self, envelope: Envelope, *, verify: bool = True
                ) -> Prepared | Rejected | Expired: ...

    @overload
    def prepare(self, envelope: Envelope, *, check_expiry: Literal[False], verify: bool = True
                ) -> Prepared | Rejected: ...

    def prepare(self, envelope: Envelope, *, check_expiry: bool = True, verify: bool = True
                ) -> Prepared | Rejected | Expired:
        """Resolve the handler, check the meta and the deadline, decode + check arguments.

        An envelope past its ``stem.expiresAt`` is :class:`Expired` before its
        arguments are decoded: it will not run, so they do not matter (the Dart worker
        checks in the same place, every delivery, retries too). ``check_expiry=False``
        is for a process-pool child, whose parent already checked; ``verify=False`` too
        (the parent verified the signature, see :mod:`stem.signing`).
        """
        if verify and self.app.signer is not None:
            refused = signature_rejection(self.app.signer, envelope)
            if refused is not None:
                return refused
        definition = self.app.tasks.get(envelope.name)
        if definition is None or definition.func is None:
            return Rejected(f"unknown task {envelope.name!r}: no handler registered in this "
                            "worker's app", UnknownTaskError.__name__)
        expires: datetime | None = None
        ignore_result = definition.options.ignore_result
        if envelope.meta and not _CALL_META_KEYS.isdisjoint(envelope.meta):
            problem = meta_problem(envelope.meta)
            if problem is not None:
                return Rejected(f"invalid envelope: {problem}", "EnvelopeDecodeError")
            deadline = envelope.meta.get(META_EXPIRES_AT)
            if deadline is not None:
                expires = _deadline(deadline)  # meta_problem checked it reads
                if check_expiry and utcnow() > expires:
                    return Expired(envelope, definition, expires)
            flag = envelope.meta.get(META_IGNORE_RESULT)
            if flag is not None:  # the call's choice wins over the task's option
                ignore_result = ignore_result_flag(flag)
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
        return Prepared(envelope, definition, args, kwargs, expires, ignore_result)

    def success(self, prepared: Prepared, value: Any) -> Success | Failure:
        """Encode the handler's return value (once); nothing to encode if it is ignored."""
        if prepared.ignore_result:
            # Stored as a JSON null, which every reader decodes; a value no encoder
            # takes is then no failure, as nobody will read it.
            return Success(None, JsonPayloadEncoder.id)
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

        In order: ``Reject`` and errors that declare themselves not retryable
        (:func:`~stem.retry.is_retryable`) fail at once, as do errors the task's
        ``autoretry_for`` / ``dont_autoretry_for`` or the retry policy's filters leave
        out (acked, or dead-lettered for ``Reject(dead_letter=True)``). Otherwise,
        with no retry left the task fails and is dead-lettered as
        ``max-retries-exhausted``; else it is retried after the ``Retry``'s
        countdown/eta, the retry policy's delay or the retry strategy's.

        The retry policy is the envelope's ``stem.retryPolicy`` (the call's), else the
        task's. The budget is ``Retry(max_retries=)``, else the policy's
        ``max_retries``, else the call's ``max_retries``, else the larger of the
        envelope's and the task's; at most ``MAX_ATTEMPTS``. The delay is clamped by
        :func:`~stem.retry.clamp_delay`, so the next envelope is always one that decodes.
        """
        env = prepared.envelope
        options = prepared.definition.options
        if isinstance(exc, Reject):
            return Failure(_task_error(exc, retryable=False),
                           exc.reason if exc.dead_letter else None)
        if isinstance(exc, RemoteError) and exc.reject is not None:
            return Failure(_task_error(exc, retryable=False),
                           exc.reject if exc.reject_dead_letter else None)
        policy = _policy(env.meta, options.retry_policy)
        if not isinstance(exc, Retry) and (
                not is_retryable(exc) or not options.retries(exc)
                or (policy is not None and not policy.retries(exc))):
            return Failure(_task_error(exc, retryable=False))
        explicit = env.meta.get(META_MAX_RETRIES)  # checked by prepare()
        if policy is not None and policy.max_retries is not None:
            budget = policy.max_retries
        elif explicit is not None:
            budget = int(explicit)
        else:
            budget = max(env.max_retries, options.max_retries)
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
                next_meta.pop(META_TIME_LIMIT, None)
                next_meta[META_TIME_LIMIT_MS] = limit_ms(exc.time_limit)
            if exc.soft_time_limit is not None:
                next_meta.pop(META_SOFT_TIME_LIMIT, None)
                next_meta[META_SOFT_TIME_LIMIT_MS] = limit_ms(exc.soft_time_limit)
            if exc.retry_policy is not None:
                next_meta[META_RETRY_POLICY] = exc.retry_policy.to_meta()
            cause = exc.exc or exc
        budget = min(budget, MAX_ATTEMPTS)
        if env.attempt >= budget:
            error = _task_error(cause, retryable=False)
            return Failure(error, f"{MAX_RETRIES_EXHAUSTED}: {_describe(error)}")
        if delay is None:
            if policy is not None:
                delay = clamp_delay(policy.next_delay(env.attempt, cause))
            else:
                strategy = options.retry_strategy or self.retry_strategy
                delay = clamp_delay(strategy.next_delay(env.attempt, cause))
        now = utcnow()
        next_env = env.copy(
            attempt=env.attempt + 1,
            not_before=now + timedelta(seconds=delay),
            meta=next_meta,
            max_retries=budget,
        )
        if self.app.signer is not None:  # the old signature covers the old attempt
            self.app.signer.sign_or_strip(next_env)
        return RetryLater(next_env, _task_error(cause, retryable=True), delay)


def _policy(meta: dict[str, Any], default: RetryPolicy | None) -> RetryPolicy | None:
    """The envelope's ``stem.retryPolicy`` (checked by ``prepare``), else ``default``."""
    data = meta.get(META_RETRY_POLICY) if meta else None
    if data is None:
        return default
    return RetryPolicy.from_meta(data)


def _describe(error: TaskError) -> str:
    """``Type: message`` of an error, at most 500 characters (for a dead-letter reason)."""
    text = f"{error.type}: {error.message}" if error.message else error.type
    return text if len(text) <= 500 else text[:497] + "..."


def signature_rejection(signer: PayloadSigner, envelope: Envelope) -> Rejected | None:
    """A :class:`Rejected` (dead letter ``signature-invalid``) unless the signature verifies."""
    problem = signer.verify(envelope)
    if problem is None:
        return None
    return Rejected(problem.reason, "SignatureInvalid", meta=problem.status_meta(),
                    error_meta=problem.error_meta())


def _task_error(exc: BaseException, *, retryable: bool) -> TaskError:
    if isinstance(exc, RemoteError):  # keep the type, message and stack from the child
        return replace(exc.error, retryable=retryable)
    return TaskError.from_exception(exc, retryable=retryable)
