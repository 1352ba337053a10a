"""Task definitions: options, typed definitions (ParamSpec) and call builders."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, cast

from stem._convert import ArgConverter, converters_for
from stem._sync import refuse_in_event_loop as _refuse_in_event_loop
from stem.encoding import TaskPayloadEncoder
from stem.envelope import DEFAULT_QUEUE, MAX_ATTEMPTS
from stem.errors import ConfigurationError, TaskArgumentError
from stem.limits import check_visibility_timeout
from stem.ratelimit import parse_rate
from stem.retry import RetryPolicy, RetryStrategy
from stem.unique import check_unique_for

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.canvas import Signature
    from stem.status import TaskResult

P = ParamSpec("P")
R = TypeVar("R")

Isolation = Literal["inline", "thread", "process"]
#: What a worker does with a rate-limited task while the limiter's store is unreachable:
#: run it unlimited ("open") or re-schedule it until the store answers ("closed").
RateLimitFailure = Literal["open", "closed"]

#: Envelope meta keys for per-call limits, as the Dart Stem writes them (whole
#: milliseconds), so workers of either apply what the caller asked. Producers write
#: these; workers read them first.
META_TIME_LIMIT_MS = "stem.timeLimitMs"
META_SOFT_TIME_LIMIT_MS = "stem.softTimeLimitMs"
#: The keys older Stem for Python releases wrote (seconds): still read, never written.
META_TIME_LIMIT = "timeLimit"
META_SOFT_TIME_LIMIT = "softTimeLimit"
#: Set when a call overrides ``max_retries`` explicitly; otherwise the worker's own task
#: options count too (a producer enqueueing by name does not know them). The envelope's
#: ``maxRetries`` carries the same number, which is what a Dart worker reads.
META_MAX_RETRIES = "__stemMaxRetries"
#: The call's (else the task's) :class:`~stem.retry.RetryPolicy`, the Dart Stem's JSON.
META_RETRY_POLICY = "stem.retryPolicy"
#: Lineage of a task enqueued from another task's context (the Dart Stem's keys); older
#: releases wrote the headers ``stem-parent-id`` / ``stem-root-id``, still read.
META_PARENT_TASK_ID = "stem.parentTaskId"
META_ROOT_TASK_ID = "stem.rootTaskId"
#: Envelope meta keys the Dart Stem writes for ``expires`` and ``ignoreResult``, so tasks
#: from either producer are honoured by either worker: the absolute expiry time (an
#: ISO-8601 UTC string) and whether the worker stores the result (true: it stores none).
META_EXPIRES_AT = "stem.expiresAt"
META_IGNORE_RESULT = "stem.ignoreResult"
#: Envelope meta key of a per-call ``rate_limit`` (``with_options(rate_limit="5/s")``),
#: which the worker applies instead of the task's own.
META_RATE_LIMIT = "stem.rateLimit"


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task is routed, retried, isolated and limited.

    ``max_retries`` counts retries after the first attempt. ``priority`` is 0-9,
    higher first. Times are seconds. ``isolation`` None means: inline for
    ``async def``, thread for ``def`` (process when a sync task has a hard
    ``time_limit``, because a thread cannot be killed, or when the worker runs a
    ``--pool``; see :func:`isolation_for`); an ``async def`` handler cannot ask for
    ``"thread"`` (a ConfigurationError when it is registered). ``visibility_timeout`` must lie
    within the lease bounds of :mod:`stem.limits` (0.1 s to 7 days) and
    ``max_retries`` within ``0..MAX_ATTEMPTS``; anything else is a ConfigurationError.

    ``unique=True`` allows one queued or running task per (task, queue, arguments)
    at a time: an equal call while the first is pending returns the first's id
    (:mod:`stem.unique`). ``unique_for`` bounds how long that holds (seconds; default
    the visibility timeout, else five minutes); ``unique_key`` computes the key from
    the arguments instead.

    ``expires`` (seconds, >= 0) gives every call a deadline that many seconds after its
    enqueue: a worker that gets the task later cancels it instead of running it (see
    :func:`check_expires`). ``ignore_result=True`` makes the worker store a success
    without its value (``payload`` null); failures are stored as usual.

    ``autoretry_for`` / ``dont_autoretry_for`` (exception classes) choose which errors
    are retried (:meth:`retries`); ``retry_policy`` (a :class:`~stem.retry.RetryPolicy`)
    sets budget, delay and name filters together, the Dart Stem's way. See
    docs/reliability.md, "Retries and failures".

    ``rate_limit`` (``"10/s"``, ``"100/m"``, ``"500/h"``) caps how often the task starts,
    across every worker sharing the limiter's store, per value of the
    ``rate_limit_key_header`` header (``tenant``; calls without it share the budget
    ``global``; None: one budget for the task). ``group_rate_limit`` caps a group of
    tasks together: the group is ``group_rate_key``, else the value of the
    ``group_rate_key_header`` header, else ``global``. A delivery over a limit is
    re-scheduled, not run and not failed (see docs/rate-limits.md);
    ``rate_limit_failure`` says what happens while the limiter's store is down.
    """

    queue: str = DEFAULT_QUEUE
    max_retries: int = 0
    priority: int = 0
    visibility_timeout: float | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    isolation: Isolation | None = None
    rate_limit: str | None = None
    rate_limit_key_header: str | None = "tenant"
    group_rate_limit: str | None = None
    group_rate_key: str | None = None
    group_rate_key_header: str | None = "tenant"
    rate_limit_failure: RateLimitFailure = "open"
    unique: bool = False
    unique_for: float | None = None
    unique_key: Callable[[dict[str, Any]], str] | None = None
    result_ttl: float | None = None
    track_started: bool = True
    retry_strategy: RetryStrategy | None = None
    args_encoder: TaskPayloadEncoder | None = None
    result_encoder: TaskPayloadEncoder | None = None
    expires: float | None = None
    ignore_result: bool = False
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_policy: RetryPolicy | None = None

    def __post_init__(self) -> None:
        _check_rate_limits(self)
        if not 0 <= self.priority <= 9:
            raise ConfigurationError(f"priority must be 0-9, got {self.priority}")
        _check_max_retries(self.max_retries)
        if self.visibility_timeout is not None:
            check_visibility_timeout(self.visibility_timeout)
        if self.isolation not in (None, "inline", "thread", "process"):
            raise ConfigurationError(
                f"isolation must be 'inline', 'thread' or 'process', got {self.isolation!r}"
            )
        if self.expires is not None:
            # A task default is relative: each enqueue turns it into its own deadline.
            if isinstance(self.expires, datetime):
                raise ConfigurationError(
                    "the task option expires is seconds after each enqueue; pass a datetime "
                    "per call instead (with_options(expires=...))")
            check_expires(self.expires)
        if type(self.ignore_result) is not bool:
            raise ConfigurationError(
                f"ignore_result must be True or False, got {self.ignore_result!r}")
        if type(self.unique) is not bool:
            raise ConfigurationError(f"unique must be True or False, got {self.unique!r}")
        check_unique_for(self.unique_for)
        if self.unique_key is not None:
            if not callable(self.unique_key):
                raise ConfigurationError(
                    "unique_key must be a function of the call's arguments (a dict by "
                    f"parameter name) returning a string, got {self.unique_key!r}")
            if not self.unique:
                raise ConfigurationError("unique_key needs unique=True")
        if self.unique_for is not None and not self.unique:
            raise ConfigurationError("unique_for needs unique=True")
        for option in ("autoretry_for", "dont_autoretry_for"):
            value = getattr(self, option)
            if isinstance(value, type):
                value = (value,)
            if not isinstance(value, tuple | list) or not all(
                    isinstance(c, type) and issubclass(c, BaseException) for c in value):
                raise ConfigurationError(
                    f"{option} must be a tuple of exception classes, got {value!r}")
            object.__setattr__(self, option, tuple(value))
        if self.retry_policy is not None and not isinstance(self.retry_policy, RetryPolicy):
            raise ConfigurationError(
                f"retry_policy must be a stem.RetryPolicy, got {self.retry_policy!r}")

    def retries(self, exc: BaseException) -> bool:
        """Whether ``autoretry_for`` / ``dont_autoretry_for`` let ``exc`` be retried.

        Matched with ``isinstance`` (an error from a process-pool child, which arrives
        without its class, by the names of its class and base classes). The deny list
        wins; an empty ``autoretry_for`` lets every error through.
        """
        if not self.autoretry_for and not self.dont_autoretry_for:
            return True
        names: set[str] | None = getattr(exc, "stem_type_names", None)

        def matches(classes: tuple[type[BaseException], ...]) -> bool:
            if names is not None:
                return any(c.__name__ in names for c in classes)
            return isinstance(exc, classes)

        if self.dont_autoretry_for and matches(self.dont_autoretry_for):
            return False
        return not self.autoretry_for or matches(self.autoretry_for)


def limit_ms(seconds: float) -> int:
    """A time limit in whole milliseconds for the meta (at least 1: 0 would mean none)."""
    value = float(seconds)
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"a time limit must be seconds > 0, got {seconds!r}")
    return max(1, round(value * 1000))


def _check_rate_limits(options: TaskOptions) -> None:
    """Refuse (ConfigurationError) a rate that does not parse and group or header
    options that could not take effect."""
    for option in ("rate_limit", "group_rate_limit"):
        value = getattr(options, option)
        if value is not None:
            try:
                parse_rate(value)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{option}: {exc}") from None
    for option in ("rate_limit_key_header", "group_rate_key", "group_rate_key_header"):
        value = getattr(options, option)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(f"{option} must be a non-empty string or None, "
                                     f"got {value!r}")
    if options.group_rate_key is not None and options.group_rate_limit is None:
        raise ConfigurationError("group_rate_key needs group_rate_limit (the group's rate)")
    if options.rate_limit_failure not in ("open", "closed"):
        raise ConfigurationError(
            f"rate_limit_failure must be 'open' or 'closed', got {options.rate_limit_failure!r}")


def _check_max_retries(value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_ATTEMPTS:
        raise ConfigurationError(
            f"max_retries must be a whole number in 0..{MAX_ATTEMPTS}, got {value!r}")


def _is_context_param(param: inspect.Parameter) -> bool:
    ann = param.annotation
    if isinstance(ann, str):
        return ann.rsplit(".", 1)[-1] == "TaskContext"
    return getattr(ann, "__name__", None) == "TaskContext"


class TaskDefinition(Generic[P, R]):
    """A named task: its handler (if this process has it), options and signature.

    What ``@app.task`` returns. Producers that don't import the handler can build
    one from a name alone (``TaskDefinition("email.send", params=("to", "subject"))``)
    and still get typed ``enqueue``/``call``/``wait``.
    """

    def __init__(
        self,
        name: str,
        func: Callable[..., Any] | None = None,
        *,
        options: TaskOptions | None = None,
        app: Stem | None = None,
        decode: Callable[[Any], R] | None = None,
        params: Sequence[str] | None = None,
    ) -> None:
        if not name:
            raise ConfigurationError("a task needs a non-empty name")
        self.name = name
        self.func = func
        self.options = options or TaskOptions()
        self.app = app
        self.decode = decode
        self.takes_context = False
        self.is_async = False
        self.signature: inspect.Signature | None = None
        if func is not None:
            self.is_async = inspect.iscoroutinefunction(func)
            if self.is_async and self.options.isolation == "thread":
                raise ConfigurationError(
                    f"task {name!r}: async handlers run inline or in the process pool, "
                    "not with isolation='thread'")
            sig = inspect.signature(func)
            ps = list(sig.parameters.values())
            if ps and _is_context_param(ps[0]):
                self.takes_context = True
                ps = ps[1:]
            self.signature = sig.replace(parameters=ps)
        elif params is not None:
            self.signature = inspect.Signature(
                [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params]
            )
        self._var_positional: str | None = None
        self._var_keyword: str | None = None
        self._positional_only: list[str] = []
        # For the worker's hot path: a call with only named, known arguments that
        # covers every required one fits the signature without Signature.bind.
        self._names: frozenset[str] = frozenset()
        self._required: frozenset[str] = frozenset()
        if self.signature is not None:
            names, required = set(), set()
            for p in self.signature.parameters.values():
                if p.kind is p.VAR_POSITIONAL:
                    self._var_positional = p.name
                elif p.kind is p.VAR_KEYWORD:
                    self._var_keyword = p.name
                elif p.kind is p.POSITIONAL_ONLY:
                    self._positional_only.append(p.name)
                else:
                    names.add(p.name)
                    if p.default is p.empty:
                        required.add(p.name)
            self._names, self._required = frozenset(names), frozenset(required)
        self._simple = (
            self.signature is not None
            and not self._positional_only
            and self._var_positional is None
            and self._var_keyword is None
        )
        # Built on the first call (hints may name classes defined after the handler);
        # a definition without a handler converts nothing.
        self._converters: dict[str, ArgConverter] | None = None if func is not None else {}

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name!r} queue={self.options.queue!r}>"

    @property
    def effective_isolation(self) -> Isolation:
        """Where the handler runs in a worker started without ``--pool``, for a call
        that does not override ``time_limit`` (:func:`isolation_for`)."""
        return isolation_for(self, self.options.time_limit, False)

    # -- argument mapping ---------------------------------------------------------------

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Map call arguments to the wire's args object, checking them against the signature.

        Positional arguments are bound to parameter names; defaults are not filled in
        (the handler's own defaults apply when it runs). Raises TaskArgumentError.
        """
        if self.signature is None:
            if args:
                raise TaskArgumentError(
                    f"task {self.name!r}: positional arguments need the task's signature; "
                    "pass keyword arguments, register the handler, or give params=(...)"
                )
            return dict(kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskArgumentError(f"task {self.name!r}: {exc}") from None
        out = dict(bound.arguments)
        if self._var_positional and self._var_positional in out:
            out[self._var_positional] = list(out[self._var_positional])
        if self._var_keyword and self._var_keyword in out:
            out.update(out.pop(self._var_keyword))
        return out

    def call_arguments(self, data: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Invert :meth:`bind` for the handler call; raises TaskArgumentError if they don't fit."""
        converters = self._converters
        if converters is None:
            converters = self._build_converters()
        if self._simple:
            keys = data.keys()
            if keys <= self._names and self._required <= keys:
                if not converters:
                    return [], dict(data)
                return [], self._convert(dict(data), converters)
        kwargs = self._convert(dict(data), converters) if converters else dict(data)
        positional: list[Any] = [kwargs.pop(n) for n in self._positional_only if n in kwargs]
        if self._var_positional and self._var_positional in kwargs:
            extra = kwargs.pop(self._var_positional)
            if not isinstance(extra, list):
                raise TaskArgumentError(
                    f"task {self.name!r}: *{self._var_positional} must be a list"
                )
            positional.extend(extra)
        if self.signature is not None:
            try:
                self.signature.bind(*positional, **kwargs)
            except TypeError as exc:
                raise TaskArgumentError(f"task {self.name!r}: {exc}") from None
        return positional, kwargs

    def _build_converters(self) -> dict[str, ArgConverter]:
        converters: dict[str, ArgConverter] = {}
        if self.func is not None and self.signature is not None:
            converters = converters_for(self.func, self.signature.parameters,
                                        self._var_positional)
        self._converters = converters
        return converters

    def _convert(self, kwargs: dict[str, Any], converters: dict[str, ArgConverter]
                 ) -> dict[str, Any]:
        """Convert the arguments that have a converter, in place (see :mod:`stem._convert`)."""
        for param, (convert, type_label) in converters.items():
            if param in kwargs:
                value = kwargs[param]
                try:
                    kwargs[param] = convert(value)
                except Exception as exc:  # any failure is bad input: dead-letter, not retry
                    why = str(exc) or type(exc).__name__
                    if len(why) > 200:  # a parser may quote the whole (hostile) value
                        why = why[:200] + "..."
                    raise TaskArgumentError(
                        f"task {self.name!r}: argument {param!r}: cannot convert "
                        f"{value!r:.60} to {type_label}: {why}") from None
        return kwargs

    # -- calling the handler directly (tests) ---------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call the handler here and now, as a plain function (Celery's ``task(...)``).

        Nothing is enqueued, encoded, converted, retried or stored: this is the handler
        itself, for unit tests. A ``def`` handler returns its value; an ``async def``
        one returns its coroutine (``await charge(1)``). A handler that takes a
        :class:`~stem.context.TaskContext` gets a fresh recording one from
        :func:`stem.testing.make_context` (to pass your own, call
        ``task.func(ctx, ...)``). ``@app.task`` returns a :class:`SyncTaskDefinition` or
        an :class:`AsyncTaskDefinition`, whose ``__call__`` is typed precisely.
        """
        func = self.func
        if func is None:
            raise ConfigurationError(
                f"task {self.name!r} has no handler in this process: enqueue it instead")
        if self.takes_context:
            # Imported here: `import stem` does not import the testing helpers.
            from stem.testing import make_context

            return func(make_context(name=self.name, app=self.app), *args, **kwargs)
        return func(*args, **kwargs)

    # -- producer API -------------------------------------------------------------------

    def _require_app(self) -> Stem:
        if self.app is None:
            raise ConfigurationError(
                f"task {self.name!r} is not attached to an app; use app.enqueue_call(...) "
                "or create it with @app.task / app.definition(...)"
            )
        return self.app

    def call(self, *args: P.args, **kwargs: P.kwargs) -> TaskCall[R]:
        """A call with bound arguments; refine it with ``.with_options(...)``."""
        return TaskCall(self, self.bind(args, kwargs))

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature (stem.canvas): this task with some arguments, for a chain, group,
        chord or link. In a chain or a callback it gets the previous result as its first
        argument, ahead of ``args``, so its arguments are partial (typed by its result)."""
        from stem.canvas import Signature

        return Signature(self, args, dict(kwargs))

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature: all the arguments (typed like the task), and the
        previous result of a chain or callback is ignored."""
        from stem.canvas import Signature

        return Signature(self, args, dict(kwargs), immutable=True)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Publish one call and return its task id."""
        return await self._require_app().enqueue_call(self.call(*args, **kwargs))

    async def wait(self, task_id: str, timeout: float | None = None, *,
                   raise_on_failure: bool = False) -> TaskResult[R]:
        """Wait for ``task_id`` to finish and return its typed result.

        ``raise_on_failure=True``: a failed or cancelled task raises TaskFailedError.
        """
        return await self._require_app().wait(task_id, timeout=timeout, decode=self.decode,
                                              raise_on_failure=raise_on_failure)

    def enqueue_sync(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """:meth:`enqueue` for sync code (scripts, WSGI views, threads); returns the id.

        Runs on the app's background event loop (see ``Stem.enqueue_sync``); from async
        code it raises SyncCallInLoopError (use ``await task.enqueue(...)``).
        """
        app = self._require_app()
        _refuse_in_event_loop(f"enqueue_sync() of task {self.name!r}", "task.enqueue(...)")
        return app.enqueue_call_sync(self.call(*args, **kwargs))

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Celery's spelling of :meth:`enqueue_sync`."""
        app = self._require_app()
        _refuse_in_event_loop(f"delay() of task {self.name!r}", "task.enqueue(...)")
        return app.enqueue_call_sync(self.call(*args, **kwargs))

    def wait_sync(self, task_id: str, timeout: float | None = None, *,
                  raise_on_failure: bool = False) -> TaskResult[R]:
        """:meth:`wait` for sync code (see :meth:`enqueue_sync`)."""
        app = self._require_app()
        _refuse_in_event_loop(f"wait_sync() of task {self.name!r}", "task.wait(...)")
        return app.wait_sync(task_id, timeout, decode=self.decode,
                             raise_on_failure=raise_on_failure)


class SyncTaskDefinition(TaskDefinition[P, R]):
    """A task whose handler is a ``def``: calling it returns the handler's value (``R``)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the handler now and return its value (see :meth:`TaskDefinition.__call__`)."""
        return cast(R, super().__call__(*args, **kwargs))


class AsyncTaskDefinition(TaskDefinition[P, R]):
    """A task whose handler is an ``async def``: calling it returns the coroutine to await."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """The handler's coroutine, to await (see :meth:`TaskDefinition.__call__`)."""
        return cast("Coroutine[Any, Any, R]", super().__call__(*args, **kwargs))


def isolation_for(definition: TaskDefinition[Any, Any], hard_limit: float | None,
                  pool_default: bool = False) -> Isolation:
    """Where one attempt of ``definition`` runs: the one rule the worker applies.

    ``hard_limit`` is the attempt's hard time limit (the task's ``time_limit``, or a
    per-call override from ``with_options`` / ``Retry(time_limit=...)``);
    ``pool_default`` is whether the worker was started with a process pool for ``def``
    handlers (``--pool N``, ``Worker(pool_size=N)``).

    An explicit ``TaskOptions.isolation`` always wins (an ``async def`` handler is
    refused ``"thread"`` when it is registered). Otherwise ``async def`` handlers run
    inline (with or without a pool: they cooperate, so they need no process to be
    stopped), and ``def`` handlers in a thread — or in the process pool when the
    attempt has a hard limit (a thread cannot be killed) or the worker has a pool.
    """
    explicit = definition.options.isolation
    if explicit is not None:
        return explicit
    if definition.is_async:
        return "inline"
    return "process" if hard_limit is not None or pool_default else "thread"


def check_schedule(countdown: float | None, eta: datetime | None) -> None:
    """Refuse (ConfigurationError) a ``countdown`` that is negative or not a number and
    an ``eta`` that is not a datetime or lies before 1970-01-01 UTC (a naive ``eta``
    is local time)."""
    if countdown is not None and (isinstance(countdown, bool)
                                  or not isinstance(countdown, int | float)
                                  or not countdown >= 0):
        raise ConfigurationError(
            f"countdown must be a number of seconds >= 0, got {countdown!r}")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise ConfigurationError(f"eta must be a datetime, got {type(eta).__name__}")
        try:
            before_1970 = eta.timestamp() < 0
        except (OverflowError, ValueError, OSError):
            before_1970 = True  # outside what the platform converts: year 1 and the like
        if before_1970:
            raise ConfigurationError(f"eta must be 1970-01-01 UTC or later, got {eta.isoformat()}")


def check_expires(expires: float | datetime | None) -> None:
    """Refuse (ConfigurationError) an ``expires`` that is not a finite number of seconds
    >= 0 or an aware datetime.

    A naive datetime is refused rather than guessed at: the deadline goes on the wire
    as UTC, and a wrong guess would cancel tasks hours early or late. A time in the
    past, or one before the call's ``eta``, is allowed: the task is then cancelled
    when a worker gets it.
    """
    if expires is None:
        return
    if isinstance(expires, datetime):
        if expires.tzinfo is None or expires.utcoffset() is None:
            raise ConfigurationError(
                f"expires must be an aware datetime (e.g. datetime.now(UTC) + timedelta(...)) "
                f"or seconds from now, got the naive {expires.isoformat()}")
        return
    if isinstance(expires, bool) or not isinstance(expires, int | float) \
            or not math.isfinite(expires) or expires < 0:
        raise ConfigurationError(
            f"expires must be a finite number of seconds >= 0 or an aware datetime, "
            f"got {expires!r}")


def expires_at(expires: float | datetime, now: datetime) -> datetime:
    """The absolute deadline for ``expires`` (checked by :func:`check_expires`) given the
    enqueue time ``now``; ConfigurationError when it is beyond what a datetime holds."""
    if isinstance(expires, datetime):
        return expires
    try:
        return now + timedelta(seconds=expires)
    except OverflowError:
        raise ConfigurationError(
            f"expires {expires!r} seconds from now is beyond the year 9999") from None


@dataclass(frozen=True, slots=True)
class TaskCall(Generic[R]):
    """One invocation of a task, with per-call option overrides; immutable."""

    definition: TaskDefinition[Any, R]
    args: dict[str, Any]
    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    eta: datetime | None = None
    headers: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    max_retries: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    visibility_timeout: float | None = None
    task_id: str | None = None
    expires: float | datetime | None = None
    ignore_result: bool | None = None
    #: Signatures (stem.canvas) enqueued after this task succeeds / fails for good.
    link: tuple[Signature[Any], ...] = ()
    link_error: tuple[Signature[Any], ...] = ()
    retry_policy: RetryPolicy | None = None
    rate_limit: str | None = None
    unique: bool | None = None
    unique_for: float | None = None
    unique_key: str | None = None

    @property
    def name(self) -> str:
        """The task name."""
        return self.definition.name

    def with_options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        headers: Mapping[str, str] | None = None,
        meta: Mapping[str, Any] | None = None,
        max_retries: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        visibility_timeout: float | None = None,
        task_id: str | None = None,
        expires: float | datetime | None = None,
        ignore_result: bool | None = None,
        link: Signature[Any] | Sequence[Signature[Any]] | None = None,
        link_error: Signature[Any] | Sequence[Signature[Any]] | None = None,
        retry_policy: RetryPolicy | None = None,
        rate_limit: str | None = None,
        unique: bool | None = None,
        unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskCall[R]:
        """A copy with these options set (headers and meta are merged; ``link`` and
        ``link_error`` signatures are added to those already set: see docs/canvas.md).

        ``unique``/``unique_for`` override the task's; ``unique_key`` names this call's
        unique key (and makes it unique) instead of the one derived from its arguments.

        ``expires`` is seconds from the enqueue or an aware datetime: a worker that gets
        the task after that cancels it (state ``cancelled``, error ``TaskExpired``)
        instead of running it, retries included. ``ignore_result=True`` stores a success
        without its value; ``False`` overrides a task's ``ignore_result=True``.
        ``retry_policy`` (a :class:`~stem.retry.RetryPolicy`) replaces the task's for
        this call (it travels as the meta ``stem.retryPolicy``).
        ``rate_limit`` (``"5/s"``) replaces the task's own rate limit for this call (same
        key: the task and tenant); an unparsable one is a ConfigurationError.

        Refuses (ConfigurationError) a priority outside 0-9, a ``max_retries`` outside
        ``0..MAX_ATTEMPTS``, a ``visibility_timeout`` outside the lease bounds of
        :mod:`stem.limits`, a negative ``countdown`` and an ``eta`` before 1970
        (:func:`check_schedule`), and a negative, infinite or naive ``expires``
        (:func:`check_expires`).
        """
        if priority is not None and not 0 <= priority <= 9:
            raise ConfigurationError(f"priority must be 0-9, got {priority}")
        if max_retries is not None:
            _check_max_retries(max_retries)
        if visibility_timeout is not None:
            check_visibility_timeout(visibility_timeout)
        check_schedule(countdown, eta)
        check_expires(expires)
        if ignore_result is not None and type(ignore_result) is not bool:
            raise ConfigurationError(
                f"ignore_result must be True or False, got {ignore_result!r}")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise ConfigurationError(
                f"retry_policy must be a stem.RetryPolicy, got {retry_policy!r}")
        if rate_limit is not None:
            try:
                parse_rate(rate_limit)
            except ConfigurationError as exc:
                raise ConfigurationError(f"rate_limit: {exc}") from None
        if unique is not None and type(unique) is not bool:
            raise ConfigurationError(f"unique must be True or False, got {unique!r}")
        check_unique_for(unique_for)
        if unique_key is not None and (not isinstance(unique_key, str) or not unique_key):
            raise ConfigurationError(f"unique_key must be a non-empty string, got {unique_key!r}")
        changes: dict[str, Any] = {
            k: v
            for k, v in dict(
                queue=queue,
                priority=priority,
                countdown=countdown,
                eta=eta,
                max_retries=max_retries,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
                visibility_timeout=visibility_timeout,
                task_id=task_id,
                expires=expires,
                ignore_result=ignore_result,
                retry_policy=retry_policy,
                rate_limit=rate_limit,
                unique=unique,
                unique_for=unique_for,
                unique_key=unique_key,
            ).items()
            if v is not None
        }
        if headers:
            changes["headers"] = {**self.headers, **headers}
        if meta:
            changes["meta"] = {**self.meta, **meta}
        for key, value in (("link", link), ("link_error", link_error)):
            if value is not None:
                more = (value,) if not isinstance(value, Sequence) else tuple(value)
                changes[key] = (*getattr(self, key), *more)
        return replace(self, **changes)
