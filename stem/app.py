"""The Stem app: task registry, configuration, adapters; enqueue and wait."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from stem._time import utcnow
from stem._urls import mask_url
from stem.adapters import store_from_url
from stem.config import StemConfig, check_url
from stem.context import TaskContext
from stem.encoding import (
    ARGS_ENCODER_HEADER,
    ARGS_ENCODER_META,
    RESULT_ENCODER_META,
    TaskPayloadEncoder,
    TaskPayloadEncoderRegistry,
)
from stem.envelope import Envelope
from stem.errors import ConfigurationError, EnvelopeDecodeError, WaitTimeoutError
from stem.limits import check_visibility_timeout, clamp_priority
from stem.ports import DEFAULT_RESULT_TTL, Broker, ResultBackend, Store, TransactionalPublisher
from stem.retry import RetryStrategy
from stem.status import TaskResult, TaskStatus
from stem.task import (
    META_MAX_RETRIES,
    META_SOFT_TIME_LIMIT,
    META_TIME_LIMIT,
    Isolation,
    TaskCall,
    TaskDefinition,
    TaskOptions,
)

P = ParamSpec("P")
R = TypeVar("R")


class TaskDecorator(Protocol):
    """What ``@app.task(...)`` returns: turns a handler into a TaskDefinition."""

    @overload
    def __call__(
        self, func: Callable[Concatenate[TaskContext, P], Awaitable[R]], /
    ) -> TaskDefinition[P, R]: ...

    @overload
    def __call__(
        self, func: Callable[Concatenate[TaskContext, P], R], /
    ) -> TaskDefinition[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]], /) -> TaskDefinition[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> TaskDefinition[P, R]: ...


class Stem:
    """A Stem application: register tasks with ``@app.task``, enqueue them, wait for results.

    ``broker`` and ``backend`` take URLs, stores (:class:`stem.ports.Store`, e.g. a
    ``PostgresStore`` built on your own pool) or adapter objects. Each distinct URL
    gets one store, so a broker and a backend on the same URL share its connections.
    With neither, the app reads ``STEM_*`` environment variables and falls back to one
    SQLite file (``sqlite:///.stem/stem.db``), so producer and worker need no server.
    A broker object needs a backend too (a URL, store or object): there is no
    silent default for it.
    """

    def __init__(
        self,
        name: str = "stem",
        *,
        broker: str | Broker | Store | None = None,
        backend: str | ResultBackend | Store | None = None,
        namespace: str | None = None,
        encoders: TaskPayloadEncoderRegistry | None = None,
        default_queue: str = "default",
        result_ttl: float = DEFAULT_RESULT_TTL,
        config: StemConfig | None = None,
    ) -> None:
        self.name = name
        self.config = config or StemConfig.from_env()
        self.namespace = namespace or self.config.namespace
        self.encoders = encoders or TaskPayloadEncoderRegistry()
        self.default_queue = default_queue
        self.result_ttl = result_ttl
        self.tasks: dict[str, TaskDefinition[Any, Any]] = {}
        self._stores: dict[str, Store] = {}
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._broker_store: Store | None = None
        self._backend_store: Store | None = None
        self._objects: list[Broker | ResultBackend] = []  # passed in; closed by close()
        if isinstance(broker, Store):
            self._broker_store = self._adopt(broker)
            self.broker_url = broker.url
        elif isinstance(broker, str) or broker is None:
            self.broker_url = self.config.broker_url if broker is None else check_url(
                broker, "broker")
        else:
            if backend is None:
                raise ConfigurationError(
                    "Stem(broker=<broker object>) needs backend= as well (a URL, a store or "
                    "a ResultBackend); or pass a store as broker= (stem.adapters."
                    "store_from_url(url)) and it provides both"
                )
            self._broker = broker
            self._objects.append(broker)
            self.broker_url = "<object>"
        if isinstance(backend, Store):
            self._backend_store = self._adopt(backend)
            self.backend_url = backend.url
        elif isinstance(backend, str):
            self.backend_url = check_url(backend, "result backend")
        elif backend is None:
            # The broker's store keeps results too unless configured otherwise.
            self.backend_url = self.config.backend_url or self.broker_url
            if self.config.backend_url is None:
                self._backend_store = self._broker_store
        else:
            self._backend = backend
            self._objects.append(backend)
            self.backend_url = "<object>"
        self._publishers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _CoalescingPublisher
        ] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<Stem {self.name!r} broker={mask_url(self.broker_url)!r} tasks={len(self.tasks)}>"

    @classmethod
    def from_env(cls, name: str = "stem", **kwargs: Any) -> Stem:
        """An app configured from ``STEM_*`` environment variables."""
        return cls(name, config=StemConfig.from_env(), **kwargs)

    # -- stores and adapters ------------------------------------------------------------

    def _adopt(self, store: Store) -> Store:
        self._stores.setdefault(store.url, store)
        return store

    def store_for(self, url: str) -> Store:
        """The app's store for ``url`` (one per distinct URL, built on first use)."""
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = store_from_url(url, namespace=self.namespace)
        return store

    @property
    def broker_store(self) -> Store | None:
        """The store the broker comes from (None for a broker object passed in)."""
        if self._broker_store is None and self._broker is None:
            self._broker_store = self.store_for(self.broker_url)
        return self._broker_store

    @property
    def backend_store(self) -> Store | None:
        """The store the result backend comes from (None for a backend object passed in)."""
        if self._backend_store is None and self._backend is None:
            self._backend_store = self.store_for(self.backend_url)
        return self._backend_store

    @property
    def broker(self) -> Broker:
        """The broker (built from its store on first use; connects lazily)."""
        if self._broker is None:
            store = self.broker_store
            assert store is not None
            self._broker = store.broker
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        """The result backend (built from its store on first use; connects lazily)."""
        if self._backend is None:
            store = self.backend_store
            assert store is not None
            self._backend = store.backend
        return self._backend

    @property
    def shared_store(self) -> Store | None:
        """The store when broker and backend come from the same one, else None."""
        broker, backend = self.broker_store, self.backend_store
        return broker if broker is not None and broker is backend else None

    async def close(self) -> None:
        """Close the app's stores and any adapter objects passed in."""
        for part in self._objects:
            await part.close()
        for store in list(self._stores.values()):
            await store.close()

    # -- registry -----------------------------------------------------------------------

    @overload
    def task(
        self, func: Callable[Concatenate[TaskContext, P], Awaitable[R]], /
    ) -> TaskDefinition[P, R]: ...

    @overload
    def task(
        self, func: Callable[Concatenate[TaskContext, P], R], /
    ) -> TaskDefinition[P, R]: ...

    @overload
    def task(self, func: Callable[P, Awaitable[R]], /) -> TaskDefinition[P, R]: ...

    @overload
    def task(self, func: Callable[P, R], /) -> TaskDefinition[P, R]: ...

    @overload
    def task(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int = 0,
        priority: int = 0,
        visibility_timeout: float | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        isolation: Isolation | None = None,
        rate_limit: str | None = None,
        unique: bool = False,
        unique_for: float | None = None,
        result_ttl: float | None = None,
        track_started: bool = True,
        retry_strategy: RetryStrategy | None = None,
        args_encoder: TaskPayloadEncoder | None = None,
        result_encoder: TaskPayloadEncoder | None = None,
        decode: Callable[[Any], Any] | None = None,
    ) -> TaskDecorator: ...

    def task(self, func: Callable[..., Any] | None = None, /, **kwargs: Any) -> Any:
        """Register a handler: ``@app.task`` or ``@app.task(name=..., queue=..., ...)``.

        The handler may be ``async def`` or ``def``; it gets the TaskContext as its
        first argument only when that parameter is annotated ``TaskContext``. The
        returned :class:`TaskDefinition` is typed by the handler's parameters (minus
        the context) and return type.
        """
        name = kwargs.pop("name", None)
        decode = kwargs.pop("decode", None)
        if kwargs.get("queue") is None:
            kwargs["queue"] = self.default_queue
        options = TaskOptions(**kwargs)

        def register(fn: Callable[..., Any]) -> TaskDefinition[Any, Any]:
            task_name = name or f"{fn.__module__}.{fn.__qualname__}"
            definition: TaskDefinition[Any, Any] = TaskDefinition(
                task_name, fn, options=options, app=self, decode=decode
            )
            return self.register(definition)

        return register(func) if func is not None else register

    def register(self, definition: TaskDefinition[P, R]) -> TaskDefinition[P, R]:
        """Add a definition to the registry (and attach it to this app)."""
        existing = self.tasks.get(definition.name)
        if existing is not None and existing.func is not None and definition.func is not None \
                and existing.func is not definition.func:
            raise ConfigurationError(f"task {definition.name!r} is registered twice")
        definition.app = self
        self.tasks[definition.name] = definition
        self._adopt_encoders(definition.options)
        return definition

    def _adopt_encoders(self, options: TaskOptions) -> None:
        # A task's own encoders join the registry so payloads naming their ids decode
        # anywhere in this process (e.g. app.wait by id); only that task encodes with them.
        for enc in (options.args_encoder, options.result_encoder):
            if enc is not None:
                self.encoders.register(enc)

    def definition(self, name: str, *, params: Sequence[str] | None = None,
                   options: TaskOptions | None = None) -> TaskDefinition[..., Any]:
        """The registered definition for ``name``, or a handler-less one for producers."""
        found = self.tasks.get(name)
        if found is not None:
            return found
        return TaskDefinition(name, options=options or TaskOptions(queue=self.default_queue),
                              app=self, params=params)

    # -- producing ----------------------------------------------------------------------

    def build_envelope(self, call: TaskCall[Any]) -> Envelope:
        """Turn a call into its wire envelope: encode args once, apply options."""
        d = call.definition
        opts = d.options
        now = utcnow()
        not_before: datetime | None = call.eta
        if call.countdown is not None:
            try:
                not_before = now + timedelta(seconds=call.countdown)
            except (OverflowError, ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"task {d.name!r}: countdown {call.countdown!r} is not a usable delay "
                    f"({exc})") from None
        if opts.args_encoder is not None or opts.result_encoder is not None:
            self._adopt_encoders(opts)  # definitions built without app.register
        args_encoder = opts.args_encoder or self.encoders.default_args_encoder
        headers = {**call.headers, ARGS_ENCODER_HEADER: args_encoder.id}
        meta = {**call.meta, ARGS_ENCODER_META: args_encoder.id}
        time_limit = call.time_limit if call.time_limit is not None else opts.time_limit
        soft = call.soft_time_limit if call.soft_time_limit is not None else opts.soft_time_limit
        if time_limit is not None:
            meta[META_TIME_LIMIT] = time_limit
        if soft is not None:
            meta[META_SOFT_TIME_LIMIT] = soft
        if call.max_retries is not None:
            meta[META_MAX_RETRIES] = call.max_retries
        kwargs: dict[str, Any] = {}
        if call.task_id is not None:
            kwargs["id"] = call.task_id
        vt = call.visibility_timeout if call.visibility_timeout is not None \
            else opts.visibility_timeout
        if vt is not None:  # with_options checked it; a TaskCall built directly did not
            vt = check_visibility_timeout(vt)
        return Envelope(
            name=d.name,
            args=self.encoders.encode_args(call.args, args_encoder),
            headers=headers,
            enqueued_at=now,
            not_before=not_before,
            # The one rule every store follows: priorities outside 0-9 are clamped.
            priority=clamp_priority(call.priority if call.priority is not None
                                    else opts.priority),
            attempt=0,
            max_retries=call.max_retries if call.max_retries is not None else opts.max_retries,
            visibility_timeout=vt,
            queue=call.queue or opts.queue,
            meta=meta,
            **kwargs,
        )

    async def enqueue(
        self,
        task: str | TaskDefinition[..., Any],
        *args: Any,
        countdown: float | None = None,
        eta: datetime | None = None,
        headers: dict[str, str] | None = None,
        meta: dict[str, Any] | None = None,
        connection: Any = None,
        **kwargs: Any,
    ) -> str:
        """Publish one task by name or definition; returns its id.

        Positional arguments are bound to parameter names (a TaskArgumentError is
        raised here, before anything is published, when they don't fit).
        ``countdown``/``eta`` delay it; ``connection`` (Postgres only) publishes inside
        the caller's transaction. For tasks with parameters named like these options,
        use ``enqueue_call(task.call(...).with_options(...))``.
        """
        definition = self.definition(task) if isinstance(task, str) else task
        call = definition.call(*args, **kwargs).with_options(
            countdown=countdown, eta=eta, headers=headers, meta=meta
        )
        return await self.enqueue_call(call, connection=connection)

    async def enqueue_call(self, call: TaskCall[Any], *, connection: Any = None) -> str:
        """Publish a prepared :class:`TaskCall`; returns its task id.

        An envelope larger than ``STEM_MAX_PAYLOAD_BYTES`` (default 16 MiB) is refused
        with :class:`~stem.errors.PayloadTooLargeError` and nothing is published.
        """
        envelope = self.build_envelope(call)
        if connection is not None:
            await self._publish_with_connection(connection, [envelope])
            return envelope.id
        await self._publisher().publish(envelope)
        return envelope.id

    async def enqueue_many(
        self, calls: Iterable[TaskCall[Any]], *, connection: Any = None
    ) -> list[str]:
        """Publish many calls in one broker round-trip; returns their ids in order."""
        envelopes = [self.build_envelope(c) for c in calls]
        if connection is not None:
            await self._publish_with_connection(connection, envelopes)
        elif envelopes:
            await self.broker.publish(envelopes)
        return [e.id for e in envelopes]

    async def _publish_with_connection(self, connection: Any, envelopes: list[Envelope]) -> None:
        broker = self.broker
        if not isinstance(broker, TransactionalPublisher):
            raise ConfigurationError(
                "enqueue(..., connection=...) publishes inside your database transaction and "
                f"needs the Postgres broker; this app's broker is {type(self.broker).__name__} "
                f"({mask_url(self.broker_url)})"
            )
        await broker.publish_with_connection(connection, envelopes)

    def _publisher(self) -> _CoalescingPublisher:
        loop = asyncio.get_running_loop()
        pub = self._publishers.get(loop)
        if pub is None:
            pub = self._publishers[loop] = _CoalescingPublisher(self)
        return pub

    # -- results ------------------------------------------------------------------------

    def to_result(self, status: TaskStatus, decode: Callable[[Any], Any] | None = None
                  ) -> TaskResult[Any]:
        """Decode a stored status into a caller-facing :class:`TaskResult`."""
        value: Any = None
        if status.state.value == "succeeded":
            value = self.encoders.decode_result(
                status.payload, status.meta.get(RESULT_ENCODER_META)
            )
            if decode is not None:
                value = decode(value)
        return TaskResult(
            id=status.id,
            state=status.state,
            value=value,
            error=status.error,
            attempt=status.attempt,
            meta=status.meta,
            raw_payload=status.payload,
        )

    async def get_result(self, task_id: str) -> TaskResult[Any] | None:
        """The task's current result, or None if unknown (not started yet, or expired)."""
        status = await self.backend.get(task_id)
        return None if status is None else self.to_result(status)

    # Two overloads so a plain ``await app.wait(id)`` is a TaskResult[Any] under mypy
    # --strict instead of an uninferable TaskResult[R].
    @overload
    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult[Any]: ...

    @overload
    async def wait(
        self, task_id: str, timeout: float | None = None, *, decode: Callable[[Any], R] | None
    ) -> TaskResult[R]: ...

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        decode: Callable[[Any], Any] | None = None,
    ) -> TaskResult[Any]:
        """Wait until ``task_id`` succeeds, fails or is cancelled; WaitTimeoutError if not in time."""
        status = await self.backend.wait(task_id, timeout)
        if status is None:
            raise WaitTimeoutError(f"task {task_id} did not finish within {timeout} s")
        return self.to_result(status, decode)


class _CoalescingPublisher:
    """Batches concurrent ``enqueue`` calls into few publishes, without delaying any.

    An idle producer publishes at once. Calls made while a publish is in flight wait
    for it and then go together in the next one, so a busy service sends hundreds per
    round-trip with no timer (no "wait 5 ms to fill a batch"). Each caller gets its
    own future, so a failed batch fails exactly the callers that were in it.
    """

    def __init__(self, app: Stem) -> None:
        self._app = app
        self._pending: list[tuple[Envelope, asyncio.Future[None]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, envelope: Envelope) -> None:
        if not self._busy:
            self._busy = True
            try:
                await self._app.broker.publish([envelope])
            finally:
                self._next()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((envelope, fut))
        await fut

    def _next(self) -> None:
        """After a publish: send what queued up meanwhile, or become idle."""
        if not self._pending:
            self._busy = False
            return
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send_then_next(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_then_next(self, batch: list[tuple[Envelope, asyncio.Future[None]]]) -> None:
        try:
            await self._send(batch)
        finally:
            self._next()

    async def _send(self, batch: list[tuple[Envelope, asyncio.Future[None]]]) -> None:
        try:
            await self._app.broker.publish([env for env, _ in batch])
        except EnvelopeDecodeError as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            # One call's arguments could not be serialised: publish one by one so only
            # that caller gets the error (rare path; the common one stays batched).
            for item in batch:
                await self._send([item])
        except BaseException as exc:
            self._fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    @staticmethod
    def _fail(batch: list[tuple[Envelope, asyncio.Future[None]]], exc: BaseException) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)


__all__ = ["Stem", "TaskContext"]
