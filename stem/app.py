"""The Stem app: task registry, configuration, adapters; enqueue and wait."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import re
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from fnmatch import translate
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar, overload

from stem import signals, tracing
from stem._sync import SyncBridge, refuse_in_event_loop
from stem._time import to_iso, utcnow, wire_now
from stem._urls import mask_url
from stem.adapters import store_from_url
from stem.adapters._shared import add_then_publish
from stem.beat.entry import ScheduleEntry
from stem.config import StemConfig, check_namespace, check_revoke_url, check_url
from stem.context import TaskContext
from stem.encoding import (
    ARGS_ENCODER_HEADER,
    ARGS_ENCODER_META,
    RESULT_ENCODER_META,
    TaskPayloadEncoder,
    TaskPayloadEncoderRegistry,
)
from stem.envelope import Envelope, new_task_id
from stem.errors import (
    ConfigurationError,
    EnvelopeDecodeError,
    TaskFailedError,
    TaskNotFoundError,
    WaitTimeoutError,
)
from stem.groups import GroupRecord
from stem.limits import check_visibility_timeout, clamp_priority
from stem.log import get_logger
from stem.ports import (
    AtomicPublishStore,
    Broker,
    LockStore,
    RateLimiter,
    ResultBackend,
    RevokeStore,
    Store,
    TransactionalPublisher,
)
from stem.retry import RetryPolicy, RetryStrategy
from stem.revoke import RevokeEntry, default_requester, new_version
from stem.signals import AppSignals
from stem.signing import PayloadSigner, SigningConfig, signer_for
from stem.stats import AppStats
from stem.status import TaskResult, TaskState, TaskStatus
from stem.task import (
    META_EXPIRES_AT,
    META_IGNORE_RESULT,
    META_MAX_RETRIES,
    META_RATE_LIMIT,
    META_RETRY_POLICY,
    META_SOFT_TIME_LIMIT_MS,
    META_TIME_LIMIT_MS,
    AsyncTaskDefinition,
    Isolation,
    RateLimitFailure,
    SyncTaskDefinition,
    TaskCall,
    TaskDefinition,
    TaskOptions,
    check_expires,
    check_schedule,
    expires_at,
    limit_ms,
)
from stem.tls import TlsConfig
from stem.unique import (
    DEFAULT_UNIQUE_FOR,
    MAX_DUPLICATES,
    META_UNIQUE_DUPLICATES,
    META_UNIQUE_KEY,
    duplicate_record,
    unique_key_of,
    unique_lock_of,
    unique_meta,
)

if TYPE_CHECKING:
    from stem.canvas import BatchStatus, BatchSubmission, Signature
    from stem.testing._eager import EagerRunner

P = ParamSpec("P")
R = TypeVar("R")

log = get_logger(__name__)

#: Apps alive in this process, so a forked child can reset their locks and connections.
_apps: weakref.WeakSet[Stem] = weakref.WeakSet()


class TaskDecorator(Protocol):
    """What ``@app.task(...)`` returns: turns a handler into a TaskDefinition."""

    # An async handler matches the sync overloads too (R = its coroutine); the first
    # match wins, so it gets the AsyncTaskDefinition: the overlap is intended.
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[Concatenate[TaskContext, P], Awaitable[R]], /
    ) -> AsyncTaskDefinition[P, R]: ...

    @overload
    def __call__(
        self, func: Callable[Concatenate[TaskContext, P], R], /
    ) -> SyncTaskDefinition[P, R]: ...

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Awaitable[R]], /) -> AsyncTaskDefinition[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> SyncTaskDefinition[P, R]: ...


class Stem:
    """A Stem application: register tasks with ``@app.task``, enqueue them, wait for results.

    ``broker`` and ``backend`` take URLs, stores (:class:`stem.ports.Store`, e.g. a
    ``PostgresStore`` built on your own pool) or adapter objects. Each distinct URL
    gets one store per event loop (connections belong to the loop that opened them), so
    a broker and a backend on the same URL share its connections, and one app works from
    several loops in turn (``asyncio.run`` twice) and from sync code (``enqueue_sync``,
    on a background loop of its own). Stores and adapter objects passed in are used as
    they are on every loop. With neither, the app reads ``STEM_*`` environment variables
    and falls back to one SQLite file (``sqlite:///.stem/stem.db``), so producer and
    worker need no server. A broker object needs a backend too (a URL, store or
    object): there is no silent default for it.

    ``result_ttl`` is how long statuses and results are kept (seconds) for tasks that
    set none; by default the result backend's (one day).

    ``namespace`` keeps apps sharing one store apart: ``namespace=``, else
    ``STEM_NAMESPACE``, else derived from ``name`` (``Stem("Billing API")`` uses
    ``billing-api``; ``Stem()`` uses ``stem``), so a producer and its workers must agree
    on the name or the namespace (see :func:`stem.config.namespace_from_name`).

    ``routes`` maps task names to queues for tasks that do not name their queue:
    exact names first, then glob patterns (``fnmatch``) in the mapping's order, else
    ``default_queue`` (see :meth:`route`).

    ``eager=True`` (for tests) runs each task in this process when it is enqueued,
    through the worker's own pipeline, and stores its result in the backend; with
    ``eager_propagates=True`` a task that fails raises its exception from the enqueue.
    See :func:`stem.testing.eager` and docs/testing.md.

    ``rate_limit_url`` is the store whose :class:`~stem.ports.RateLimiter` workers use
    for ``rate_limit`` / ``group_rate_limit``: ``rate_limit_url=``, else
    ``STEM_RATE_LIMIT_URL``, else the broker's store (see docs/rate-limits.md).
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
        result_ttl: float | None = None,
        config: StemConfig | None = None,
        routes: Mapping[str, str] | None = None,
        eager: bool = False,
        eager_propagates: bool = False,
        signing: SigningConfig | None = None,
        tls: TlsConfig | None = None,
        rate_limit_url: str | None = None,
        revoke_store_url: str | None = None,
    ) -> None:
        self.name = name
        self.config = config or StemConfig.from_env()
        #: Signs every envelope this app publishes and verifies what its workers run
        #: (``signing=``, else ``STEM_SIGNING_*``); None when signing is off.
        self.signer: PayloadSigner | None = signer_for(
            signing if signing is not None else self.config.signing)
        #: TLS settings applied to Redis and Postgres URLs (``tls=``, else ``STEM_TLS_*``).
        self.tls = tls if tls is not None else self.config.tls
        # Explicit argument, else STEM_NAMESPACE, else derived from the name ("stem" for
        # Stem()): two apps on one store keep apart unless told to share (docs/storage.md).
        self.namespace = (self.config.namespace_for(name) if namespace is None
                          else check_namespace(namespace))
        self.encoders = encoders or TaskPayloadEncoderRegistry()
        self.default_queue = default_queue
        if result_ttl is not None and not (isinstance(result_ttl, int | float)
                                           and 0 < result_ttl < float("inf")):
            raise ConfigurationError(
                f"result_ttl must be a positive number of seconds, got {result_ttl!r}")
        #: Seconds statuses are kept when a task sets no ``result_ttl`` (None: the
        #: backend's default, one day unless its URL says ``?result_ttl=``).
        self.result_ttl = result_ttl
        #: The store keeping rate-limit state (None: the broker's; see :attr:`rate_limiter`).
        self.rate_limit_url = (self.config.rate_limit_url if rate_limit_url is None
                               else check_url(rate_limit_url, "rate limiter"))
        #: Where revocations and paused queues live (None: the backend's store, else the
        #: broker's; see :attr:`revokes`).
        self.revoke_store_url = (self.config.revoke_store_url if revoke_store_url is None
                                 else check_revoke_url(revoke_store_url, "revoke store"))
        self._file_revokes: RevokeStore | None = None
        self.routes: dict[str, str] = _check_routes(routes)
        self._exact_routes = {k: v for k, v in self.routes.items() if not _is_glob(k)}
        self._glob_routes = [(re.compile(translate(k)).match, v)
                             for k, v in self.routes.items() if _is_glob(k)]
        self._routed: dict[str, str] = {}
        self.tasks: dict[str, TaskDefinition[Any, Any]] = {}
        #: Schedule entries declared in code (``@app.periodic``, :meth:`add_periodic_task`);
        #: ``stem beat`` merges them into its schedule store when it starts.
        self.periodic_tasks: list[ScheduleEntry] = []
        self._given: dict[str, Store] = {}  # stores passed in, by URL: used on every loop
        self._given_broker: Broker | None = None
        self._given_backend: ResultBackend | None = None
        self._given_broker_store: Store | None = None
        self._given_backend_store: Store | None = None
        self._objects: list[Broker | ResultBackend] = []  # passed in; closed by close()
        if isinstance(broker, Store):
            self._given_broker_store = self._adopt(broker)
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
            self._given_broker = broker
            self._objects.append(broker)
            self.broker_url = "<object>"
        if isinstance(backend, Store):
            self._given_backend_store = self._adopt(backend)
            self.backend_url = backend.url
        elif isinstance(backend, str):
            self.backend_url = check_url(backend, "result backend")
        elif backend is None:
            # The broker's store keeps results too unless configured otherwise.
            self.backend_url = self.config.backend_url or self.broker_url
            if self.config.backend_url is None:
                self._given_backend_store = self._given_broker_store
        else:
            self._given_backend = backend
            self._objects.append(backend)
            self.backend_url = "<object>"
        # What the app built per event loop (stores, broker, backend, publisher). The
        # last loop used is cached in one tuple, so the single-loop path costs an
        # identity check; other loops are looked up (weakly) under the lock.
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopParts] = (
            weakref.WeakKeyDictionary())
        self._unbound: _LoopParts | None = None  # built outside any loop; the next loop's
        self._last: tuple[object, _LoopParts] = (object(), _LoopParts(self))
        self._inherited: list[object] = []  # a forked child's copies of the parent's parts
        self._sync = SyncBridge(self._close_current_loop)
        #: Producer counters for metrics (:class:`stem.stats.AppStats`): ``deduplicated``.
        self.stats = AppStats()
        #: This app's signals: receivers connected here hear only this app's workers,
        #: beats and producers (``stem.signals.<name>`` hears every app).
        self.signals = AppSignals()
        #: Set while enqueues run their task in-process (``eager=True``, stem.testing.eager).
        self._eager: EagerRunner | None = None
        if eager_propagates and not eager:
            raise ConfigurationError("eager_propagates=True needs eager=True")
        if eager:
            from stem.testing._eager import EagerRunner  # test tooling: loaded only when asked

            self._eager = EagerRunner(self, propagate=eager_propagates)
        _apps.add(self)

    @property
    def eager(self) -> bool:
        """Whether an enqueue runs its task in this process at once (see :mod:`stem.testing`)."""
        return self._eager is not None

    def __repr__(self) -> str:
        return f"<Stem {self.name!r} broker={mask_url(self.broker_url)!r} tasks={len(self.tasks)}>"

    @classmethod
    def from_env(cls, name: str = "stem", **kwargs: Any) -> Stem:
        """An app configured from ``STEM_*`` environment variables."""
        return cls(name, config=StemConfig.from_env(), **kwargs)

    # -- stores and adapters, per event loop ---------------------------------------------

    def _adopt(self, store: Store) -> Store:
        self._given.setdefault(store.url, store)
        return store

    def _parts(self) -> _LoopParts:
        """What the app built for the running loop (or, outside any loop, for the next)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._unbound_parts()
        last = self._last
        if last[0] is loop:
            return last[1]
        return self._parts_for(loop)

    def _unbound_parts(self) -> _LoopParts:
        with self._lock:
            parts = self._unbound
            if parts is None:
                parts = self._unbound = _LoopParts(self)
            return parts

    def _parts_for(self, loop: asyncio.AbstractEventLoop) -> _LoopParts:
        with self._lock:
            parts = self._loops.get(loop)
            if parts is None:
                # Loops that closed without shutting down their async generators (so
                # the guard below never ran) leave parts whose connections are dead:
                # drop them (they cannot be closed without their loop).
                for old in [lp for lp in self._loops if lp.is_closed()]:
                    self._loops.pop(old).disarm()
                parts, self._unbound = self._unbound or _LoopParts(self), None
                self._loops[loop] = parts
                parts.arm(self, loop)
            self._last = (loop, parts)
            return parts

    async def _loop_closing(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop is shutting down (asyncio.run's end): close what the app built on it."""
        with self._lock:
            parts = self._loops.pop(loop, None)
            if self._last[0] is loop:
                self._last = (object(), self._last[1])
        if parts is not None:
            await self._close_parts(parts)

    async def _close_parts(self, parts: _LoopParts) -> None:
        for store in list(parts.stores.values()):
            try:
                await asyncio.wait_for(store.close(), 10)
            except Exception as exc:  # a store already unreachable must not stop the rest
                log.warning("app.store_close_failed", store=repr(store), error=repr(exc))

    async def _close_current_loop(self) -> None:
        await self._close_parts(self._parts())

    def _after_fork_in_child(self) -> None:
        # The parent's connections must never be used, closed or garbage-collected here
        # (closing them could end the parent's sessions): keep them aside, start afresh.
        self._lock = threading.Lock()
        self._inherited.append((list(self._loops.values()), self._unbound, self._last))
        self._loops = weakref.WeakKeyDictionary()
        self._unbound = None
        self._last = (object(), self._last[1])
        self._sync.after_fork_in_child()

    def _url_store(self, parts: _LoopParts, url: str) -> Store:
        store = self._given.get(url) or parts.stores.get(url)
        if store is None:
            tls_url = url if self.tls is None else self.tls.apply(url)
            store = parts.stores[url] = store_from_url(tls_url, namespace=self.namespace)
        return store

    def store_for(self, url: str) -> Store:
        """The app's store for ``url`` on the running loop (one per URL, built on first use)."""
        return self._url_store(self._parts(), url)

    @property
    def broker_store(self) -> Store | None:
        """The store the broker comes from (None for a broker object passed in)."""
        if self._given_broker is not None:
            return None
        return self._given_broker_store or self.store_for(self.broker_url)

    @property
    def backend_store(self) -> Store | None:
        """The store the result backend comes from (None for a backend object passed in)."""
        if self._given_backend is not None:
            return None
        return self._given_backend_store or self.store_for(self.backend_url)

    @property
    def broker(self) -> Broker:
        """The broker on the running loop (built from its store on first use; connects lazily)."""
        parts = self._parts()
        broker = parts.broker
        if broker is None:
            broker = parts.broker = self._given_broker or (
                self._given_broker_store or self._url_store(parts, self.broker_url)).broker
        return broker

    @property
    def backend(self) -> ResultBackend:
        """The result backend on the running loop (built on first use; connects lazily)."""
        parts = self._parts()
        backend = parts.backend
        if backend is None:
            backend = parts.backend = self._given_backend or (
                self._given_backend_store or self._url_store(parts, self.backend_url)).backend
        return backend

    @property
    def rate_limiter(self) -> RateLimiter:
        """The rate limiter workers use (on the running loop): that of the
        ``rate_limit_url`` store, else of the broker's store."""
        store = (self.store_for(self.rate_limit_url) if self.rate_limit_url is not None
                 else self.broker_store)
        limiter = getattr(store, "rate_limiter", None)
        if limiter is None:
            raise ConfigurationError(
                "rate-limited tasks need a store with a rate limiter: the broker is an "
                "object without one; pass rate_limit_url= (or set STEM_RATE_LIMIT_URL)")
        return limiter  # type: ignore[no-any-return]

    @property
    def revokes(self) -> RevokeStore:
        """The revoke store (on the running loop): ``revoke_store_url`` (else
        ``STEM_REVOKE_STORE_URL``), else the result backend's store, else the broker's."""
        url = self.revoke_store_url
        if url is not None and ("://" not in url or url.startswith("file://")):
            if self._file_revokes is None:
                from stem.adapters.file_revokes import FileRevokeStore, path_from_url

                self._file_revokes = FileRevokeStore(path_from_url(url),
                                                     namespace=self.namespace)
            return self._file_revokes
        stores = [self.store_for(url)] if url is not None else [
            s for s in (self.backend_store, self.broker_store) if s is not None]
        for store in stores:
            try:
                revokes = getattr(store, "revokes", None)
            except NotImplementedError:  # an outside store without one
                continue
            if revokes is not None:
                return revokes  # type: ignore[no-any-return]
        raise ConfigurationError(
            "revoking needs a revoke store: the broker and backend are adapter objects "
            "without one; pass revoke_store_url= (or set STEM_REVOKE_STORE_URL)")

    async def revoke(self, task_id: str | Sequence[str], *, terminate: bool = False,
                     reason: str | None = None, expires_in: float | None = None,
                     requested_by: str | None = None) -> list[RevokeEntry]:
        """Revoke tasks: a queued or delayed one never runs (stored ``cancelled``), and
        with ``terminate=True`` a running one is stopped (see docs/control.md).

        Written to :attr:`revokes` first, which every worker reads (a worker started
        later honours it too); running workers apply it within a second. After
        ``expires_in`` seconds the revocation no longer applies. Returns the entries.
        """
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        base = new_version()
        entries = [RevokeEntry.new(i, terminate=terminate, reason=reason,
                                   requested_by=requested_by or default_requester(),
                                   expires_in=expires_in, namespace=self.namespace,
                                   version=base + n)
                   for n, i in enumerate(ids)]
        await self.revokes.upsert_many(entries)  # durable first, then visible
        from stem.control import announce_quietly

        await announce_quietly(self, "revoke", {
            "namespace": self.namespace, "requester": entries[0].requested_by if entries
            else None, "revocations": [e.to_json() for e in entries]})
        return entries

    async def pause_queues(self, queues: Sequence[str], *, reason: str | None = None
                           ) -> list[RevokeEntry]:
        """Stop every worker of this namespace consuming ``queues`` until
        :meth:`resume_queues` (stored in :attr:`revokes`: survives worker restarts)."""
        from stem.control import announce_quietly, queue_entries

        entries = queue_entries(self, queues, pause=True, reason=reason)
        await self.revokes.upsert_many(entries)
        await announce_quietly(self, "queue_pause", {
            "queues": list(queues), "entries": [e.to_json() for e in entries]})
        return entries

    async def resume_queues(self, queues: Sequence[str]) -> list[RevokeEntry]:
        """Undo :meth:`pause_queues` for ``queues``."""
        from stem.control import announce_quietly, queue_entries

        entries = queue_entries(self, queues, pause=False)
        await self.revokes.upsert_many(entries)
        await announce_quietly(self, "queue_resume", {
            "queues": list(queues), "entries": [e.to_json() for e in entries]})
        return entries

    @property
    def shared_store(self) -> Store | None:
        """The store when broker and backend come from the same one, else None."""
        broker, backend = self.broker_store, self.backend_store
        return broker if broker is not None and broker is backend else None

    async def close(self) -> None:
        """Close the app's stores on the running loop and any adapter objects passed in.

        Stores the app built on other loops close when their loop shuts down (the end of
        ``asyncio.run``); the sync API's loop closes at interpreter exit or with
        :meth:`close_sync`.
        """
        for part in self._objects:
            await part.close()
        stores = list(self._given.values())
        stores += [s for s in self._parts().stores.values() if s not in stores]
        for store in stores:
            await store.close()

    def close_sync(self) -> None:
        """Close the stores of the sync API's background loop and stop its thread.

        Runs by itself at interpreter exit; a later sync call starts a new loop.
        """
        refuse_in_event_loop("app.close_sync()", "app.close()")
        self._sync.close()

    # -- registry -----------------------------------------------------------------------

    # Async handlers match the sync overloads too; the first match wins (see TaskDecorator).
    @overload
    def task(  # type: ignore[overload-overlap]
        self, func: Callable[Concatenate[TaskContext, P], Awaitable[R]], /
    ) -> AsyncTaskDefinition[P, R]: ...

    @overload
    def task(
        self, func: Callable[Concatenate[TaskContext, P], R], /
    ) -> SyncTaskDefinition[P, R]: ...

    @overload
    def task(  # type: ignore[overload-overlap]
        self, func: Callable[P, Awaitable[R]], /) -> AsyncTaskDefinition[P, R]: ...

    @overload
    def task(self, func: Callable[P, R], /) -> SyncTaskDefinition[P, R]: ...

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
        rate_limit_key_header: str | None = "tenant",
        group_rate_limit: str | None = None,
        group_rate_key: str | None = None,
        group_rate_key_header: str | None = "tenant",
        rate_limit_failure: RateLimitFailure = "open",
        unique: bool = False,
        unique_for: float | None = None,
        unique_key: Callable[[dict[str, Any]], str] | None = None,
        result_ttl: float | None = None,
        track_started: bool = True,
        retry_strategy: RetryStrategy | None = None,
        args_encoder: TaskPayloadEncoder | None = None,
        result_encoder: TaskPayloadEncoder | None = None,
        decode: Callable[[Any], Any] | None = None,
        expires: float | None = None,
        ignore_result: bool = False,
        autoretry_for: tuple[type[BaseException], ...] = (),
        dont_autoretry_for: tuple[type[BaseException], ...] = (),
        retry_policy: RetryPolicy | None = None,
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
        routed = kwargs.get("queue") is None
        if routed:
            kwargs["queue"] = self.default_queue
        options = TaskOptions(**kwargs)

        def register(fn: Callable[..., Any]) -> TaskDefinition[Any, Any]:
            task_name = name or f"{fn.__module__}.{fn.__qualname__}"
            opts = replace(options, queue=self.route(task_name)) if routed else options
            # The subclass types a direct call: the value, or the coroutine to await.
            cls = AsyncTaskDefinition if inspect.iscoroutinefunction(fn) else SyncTaskDefinition
            definition: TaskDefinition[Any, Any] = cls(
                task_name, fn, options=opts, app=self, decode=decode
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

    def definition(self, name: str, *, queue: str | None = None,
                   params: Sequence[str] | None = None,
                   options: TaskOptions | None = None) -> TaskDefinition[..., Any]:
        """The registered definition for ``name``, or a handler-less one for producers.

        A producer that does not import the handler declares what it needs:
        ``app.definition("payments.charge", queue="payments", params=["amount", "to"])``
        (``params`` lets positional arguments be bound to names). Without ``queue`` (or
        ``options``) the queue comes from the app's :meth:`route`. A registered task is
        returned as it is.
        """
        found = self.tasks.get(name)
        if found is not None:
            return found
        if options is None:
            options = TaskOptions(queue=queue or self.route(name))
        elif queue is not None:
            options = replace(options, queue=queue)
        return TaskDefinition(name, options=options, app=self, params=params)

    def periodic(self, spec: str | Mapping[str, Any] | float | timedelta, *,
                 name: str | None = None, **options: Any
                 ) -> Callable[[TaskDefinition[P, R]], TaskDefinition[P, R]]:
        """Run the decorated task on a schedule (put it above ``@app.task``).

        ``spec``: a cron string (``"*/5 * * * *"``, in ``tz``, UTC by default),
        ``"every:30s"``, a number of seconds, or a Dart spec object. ``name`` is the
        entry id (default: the task name); other options as :meth:`add_periodic_task`.
        """
        def attach(definition: TaskDefinition[P, R]) -> TaskDefinition[P, R]:
            self.add_periodic_task(spec, definition, name=name, **options)
            return definition
        return attach

    def add_periodic_task(self, spec: str | Mapping[str, Any] | float | timedelta,
                          task: str | TaskDefinition[..., Any], *, name: str | None = None,
                          args: Sequence[Any] | Mapping[str, Any] | None = None,
                          kwargs: Mapping[str, Any] | None = None, queue: str | None = None,
                          tz: str | None = None, enabled: bool = True,
                          jitter: float | str | timedelta | None = None,
                          catch_up: Literal["once", "skip"] = "once",
                          expire_at: datetime | None = None,
                          meta: Mapping[str, Any] | None = None) -> ScheduleEntry:
        """Declare a schedule entry for ``task`` (a definition or a name); returns it.

        ``args``/``kwargs`` are the task's arguments (checked against its signature now);
        ``jitter`` delays each dispatch by up to that long at random; ``catch_up="skip"``
        fires none of the runs missed while no beat ran. See docs/beat.md.
        """
        from stem.beat.declare import periodic_entry

        definition = self.definition(task) if isinstance(task, str) else task
        entry = periodic_entry(spec, definition, name=name, args=args, kwargs=kwargs,
                               queue=queue, tz=tz, enabled=enabled, jitter=jitter,
                               catch_up=catch_up, expire_at=expire_at, meta=meta)
        if any(e.id == entry.id for e in self.periodic_tasks):
            raise ConfigurationError(f"periodic task {entry.id!r} is declared twice (give "
                                     "each schedule of one task its own name=)")
        self.periodic_tasks.append(entry)
        return entry

    def route(self, name: str) -> str:
        """The queue for a task ``name`` that does not name its own.

        The exact name in ``routes`` first, then the first glob pattern (``fnmatch``:
        ``*``, ``?``, ``[...]``) that matches, in the order given, else ``default_queue``.
        """
        queue = self._routed.get(name)
        if queue is None:
            queue = self._exact_routes.get(name)
            if queue is None:
                queue = next((q for match, q in self._glob_routes if match(name)),
                             self.default_queue)
            if len(self._routed) >= 4096:  # names are few in practice; bound it anyway
                self._routed.clear()
            self._routed[name] = queue
        return queue

    # -- producing ----------------------------------------------------------------------

    def build_envelope(self, call: TaskCall[Any]) -> Envelope:
        """Turn a call into its wire envelope: encode args once, apply options."""
        d = call.definition
        opts = d.options
        now = wire_now()
        check_schedule(call.countdown, call.eta)  # a TaskCall built without with_options
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
        if tracing.ENABLED and tracing.active():  # before signing, which covers headers
            tracing.inject(headers)
        meta = {**call.meta, ARGS_ENCODER_META: args_encoder.id}
        time_limit = call.time_limit if call.time_limit is not None else opts.time_limit
        soft = call.soft_time_limit if call.soft_time_limit is not None else opts.soft_time_limit
        if time_limit is not None:
            meta[META_TIME_LIMIT_MS] = limit_ms(time_limit)
        if soft is not None:
            meta[META_SOFT_TIME_LIMIT_MS] = limit_ms(soft)
        if call.max_retries is not None:
            meta[META_MAX_RETRIES] = call.max_retries
        policy = call.retry_policy or opts.retry_policy
        if policy is not None:
            meta[META_RETRY_POLICY] = policy.to_meta()
        expires = call.expires if call.expires is not None else opts.expires
        if expires is not None:
            check_expires(expires)  # a TaskCall built without with_options
            meta[META_EXPIRES_AT] = to_iso(expires_at(expires, now))
        if call.ignore_result is not None:
            # An explicit False goes on the wire too: it overrides the worker's task option.
            meta[META_IGNORE_RESULT] = call.ignore_result
        elif opts.ignore_result:
            meta[META_IGNORE_RESULT] = True
        if call.rate_limit is not None:
            meta[META_RATE_LIMIT] = call.rate_limit
        kwargs: dict[str, Any] = {}
        if call.task_id is not None:
            kwargs["id"] = call.task_id
        if call.link or call.link_error:  # callbacks' ids derive from this task's id
            from stem.canvas import link_meta  # the canvas: imported by its first user

            kwargs.setdefault("id", new_task_id())
            meta.update(link_meta(self, kwargs["id"], call.link, call.link_error))
        vt = call.visibility_timeout if call.visibility_timeout is not None \
            else opts.visibility_timeout
        if vt is not None:  # with_options checked it; a TaskCall built directly did not
            vt = check_visibility_timeout(vt)
        unique = call.unique if call.unique is not None else (
            opts.unique or call.unique_key is not None)
        if unique:
            task_id = kwargs.setdefault("id", new_task_id())
            meta.update(unique_meta(self._unique_key(call), task_id, now,
                                    call.unique_for or opts.unique_for or vt
                                    or DEFAULT_UNIQUE_FOR))
        envelope = Envelope(
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
        if self.signer is not None:
            self.signer.sign(envelope)
        return envelope

    @staticmethod
    def _unique_key(call: TaskCall[Any]) -> str:
        """A unique call's key: the call's own, the task's ``unique_key(args)``, else the
        hash of task name, queue and arguments."""
        if call.unique_key is not None:
            return call.unique_key
        d = call.definition
        if d.options.unique_key is not None:
            key = d.options.unique_key(dict(call.args))
            if not isinstance(key, str) or not key:
                raise ConfigurationError(
                    f"task {d.name!r}: unique_key must return a non-empty string, got {key!r}")
            return key
        return unique_key_of(d.name, call.queue or d.options.queue, call.args)

    async def enqueue(
        self,
        task: str | TaskDefinition[..., Any],
        *args: Any,
        countdown: float | None = None,
        eta: datetime | None = None,
        headers: dict[str, str] | None = None,
        meta: dict[str, Any] | None = None,
        connection: Any = None,
        expires: float | datetime | None = None,
        ignore_result: bool | None = None,
        link: Signature[Any] | Sequence[Signature[Any]] | None = None,
        link_error: Signature[Any] | Sequence[Signature[Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Publish one task by name or definition; returns its id.

        ``link`` / ``link_error``: signatures enqueued by the worker after the task
        succeeds (given its result first) / fails for good (see docs/canvas.md).

        Positional arguments are bound to parameter names (a TaskArgumentError is
        raised here, before anything is published, when they don't fit).
        ``countdown``/``eta`` delay it; ``expires`` (seconds from now or an aware
        datetime) cancels it if no worker starts it in time; ``ignore_result=True``
        stores its success without the value; ``connection`` (Postgres only) publishes
        inside the caller's transaction. For tasks with parameters named like these
        options, use ``enqueue_call(task.call(...).with_options(...))``.
        """
        definition = self.definition(task) if isinstance(task, str) else task
        call = definition.call(*args, **kwargs).with_options(
            countdown=countdown, eta=eta, headers=headers, meta=meta, expires=expires,
            ignore_result=ignore_result, link=link, link_error=link_error,
        )
        return await self.enqueue_call(call, connection=connection)

    async def enqueue_call(self, call: TaskCall[Any], *, connection: Any = None) -> str:
        """Publish a prepared :class:`TaskCall`; returns its task id.

        An envelope larger than ``STEM_MAX_PAYLOAD_BYTES`` (default 16 MiB) is refused
        with :class:`~stem.errors.PayloadTooLargeError` and nothing is published.
        """
        if tracing.ENABLED and tracing.active():
            d = call.definition
            with tracing.enqueue_span(d.name, call.queue or d.options.queue,
                                      self.namespace) as span:
                return await self._enqueue_call(call, connection, span)
        return await self._enqueue_call(call, connection, None)

    async def _enqueue_call(self, call: TaskCall[Any], connection: Any, span: Any) -> str:
        envelope = self.build_envelope(call)
        if span is not None:
            tracing.enqueued(span, envelope)
        if self._eager is not None:  # tests: run it here, now (no coalescing: it may nest)
            await self._eager.run([envelope])
            return envelope.id
        if connection is not None:
            subs = await self._publish_with_connection(connection, [envelope])
            return subs.get(envelope.id, envelope.id)
        return await self._publisher().publish(envelope)

    async def enqueue_many(
        self, calls: Iterable[TaskCall[Any]], *, connection: Any = None
    ) -> list[str]:
        """Publish many calls in one broker round-trip; returns their ids in order (a
        unique call that is already pending gets the pending task's id)."""
        if tracing.ENABLED and tracing.active():
            calls = list(calls)
            names = {c.definition.name for c in calls}
            with tracing.enqueue_span(names.pop() if len(names) == 1 else "*", None,
                                      self.namespace, count=len(calls)):
                return await self._enqueue_many(calls, connection)
        return await self._enqueue_many(calls, connection)

    async def _enqueue_many(self, calls: Iterable[TaskCall[Any]], connection: Any
                            ) -> list[str]:
        envelopes = [self.build_envelope(c) for c in calls]
        subs: dict[str, str] = {}
        if self._eager is not None:
            await self._eager.run(envelopes)
        elif connection is not None:
            subs = await self._publish_with_connection(connection, envelopes)
        elif envelopes:
            subs = await self._publish_new(envelopes, self._parts())
        return [subs.get(e.id, e.id) for e in envelopes]

    def _locks_of(self, envelopes: Sequence[Envelope]) -> dict[str, tuple[str, float]]:
        """The unique locks these envelopes ask for: id -> (lock key, seconds)."""
        locks: dict[str, tuple[str, float]] = {}
        now: datetime | None = None
        for env in envelopes:
            if META_UNIQUE_KEY in env.meta:
                now = now or utcnow()
                lock = unique_lock_of(env.meta, env.id, now)
                if lock is not None:
                    locks[env.id] = lock
        return locks

    async def _substitutes(self, envelopes: Sequence[Envelope], published: set[str],
                           locks: dict[str, tuple[str, float]]) -> tuple[dict[str, str],
                                                                          list[Envelope]]:
        """For envelopes not published: the task holding a unique one's lock (a
        substitute id; the duplicate is recorded on that task's status and counted), and
        those whose lock vanished meanwhile (to publish again)."""
        subs: dict[str, str] = {}
        retry: list[Envelope] = []
        duplicates: list[tuple[str, Envelope]] = []
        for env in envelopes:
            if env.id in published:
                continue
            lock = locks.get(env.id)
            owner = None if lock is None else await self.locks.owner_of(lock[0])
            if lock is None or owner == env.id:  # the id was enqueued before
                log.debug("task.duplicate", task=env.name, id=env.id)
            elif owner is None:
                retry.append(env)
            else:
                subs[env.id] = owner
                log.info("task.deduplicated", task=env.name, id=owner, duplicate=env.id)
                duplicates.append((owner, env))
        if duplicates:
            await self._record_duplicates(duplicates)
        return subs, retry

    async def _record_duplicates(self, duplicates: Sequence[tuple[str, Envelope]]) -> None:
        """Count deduplicated calls (``stats.deduplicated``) and append each to its pending
        task's status meta ``stem.unique.duplicates``, atomically in the backend (never
        over a newer status). Best effort: a failure is logged, the enqueue stands."""
        for _, env in duplicates:
            self.stats.count_deduplicated(env.name)
        # An outside backend written before append_meta existed: counted, not recorded.
        append = getattr(self.backend, "append_meta", None)
        if append is None:
            return
        now = utcnow()
        done = await asyncio.gather(*(
            append(owner, META_UNIQUE_DUPLICATES, duplicate_record(env, now),
                   max_items=MAX_DUPLICATES)
            for owner, env in duplicates), return_exceptions=True)
        for (owner, env), result in zip(duplicates, done, strict=True):
            if isinstance(result, Exception):
                log.warning("task.duplicate_not_recorded", task=env.name, id=owner,
                            duplicate=env.id, error=repr(result))
            elif isinstance(result, BaseException):
                raise result
            elif not result:  # the status is gone (expired or forgotten): nothing to add to
                log.debug("task.duplicate_not_recorded", task=env.name, id=owner,
                          duplicate=env.id, error="no status")

    async def _publish_with_connection(self, connection: Any, envelopes: list[Envelope]
                                       ) -> dict[str, str]:
        broker = self.broker
        if not isinstance(broker, TransactionalPublisher):
            raise ConfigurationError(
                "enqueue(..., connection=...) publishes inside your database transaction and "
                f"needs the Postgres broker; this app's broker is {type(self.broker).__name__} "
                f"({mask_url(self.broker_url)})"
            )
        if signals.before_task_publish.has_receivers:
            self._signal_publish(signals.before_task_publish, envelopes, None)
        subs = await self._publish_in(connection, broker, envelopes)
        if signals.after_task_publish.has_receivers:
            self._signal_publish(signals.after_task_publish, envelopes, subs)
        return subs

    async def _publish_in(self, connection: Any, broker: TransactionalPublisher,
                          envelopes: list[Envelope]) -> dict[str, str]:
        store = self.shared_store
        publish_new = getattr(store, "publish_new", None)
        locks = self._locks_of(envelopes)
        if publish_new is not None and isinstance(store, AtomicPublishStore):
            # Statuses, unique locks and jobs in the caller's transaction.
            items = self._queued_items(envelopes)
            published = await publish_new(items, default_ttl=self.backend.default_ttl,
                                          connection=connection, locks=locks or None)
            # A vanished lock is not retried here: the caller's transaction decides.
            return (await self._substitutes(envelopes, published, locks))[0]
        if locks:
            raise ConfigurationError(
                "a unique task enqueued with connection= needs the result backend (and so "
                "the lock store) in the broker's Postgres database: use one URL for both")
        await broker.publish_with_connection(connection, envelopes)
        return {}

    def _queued_items(self, envelopes: Sequence[Envelope]
                      ) -> list[tuple[Envelope, TaskStatus, float | None]]:
        """Each envelope with the ``queued`` status the producer writes for it (meta as
        the Dart producer writes it) and that status's TTL: the result TTL plus the time
        until the task is due. A repeated id in one batch keeps its first envelope."""
        now: datetime | None = None
        seen: set[str] = set()
        per_task: dict[str, tuple[str, float | None]] = {}
        out: list[tuple[Envelope, TaskStatus, float | None]] = []
        queued = TaskState.QUEUED
        for env in envelopes:
            if env.id in seen:
                continue
            seen.add(env.id)
            name = env.name
            known = per_task.get(name)
            if known is None:  # once per task name in the batch
                d = self.tasks.get(name)
                opts = d.options if d is not None else None
                encoder = (opts.result_encoder.id if opts is not None and opts.result_encoder
                           else self.encoders.default_result_encoder.id)
                base = opts.result_ttl if opts is not None else None
                known = per_task[name] = (encoder, self.result_ttl if base is None else base)
            encoder, ttl = known
            if env.not_before is not None:
                now = now or utcnow()
                wait = (env.not_before - now).total_seconds()
                if wait > 0:
                    ttl = (self.backend.default_ttl if ttl is None else ttl) + wait
            meta = {"stem.task": name, **env.meta, "queue": env.queue,
                    "maxRetries": env.max_retries, RESULT_ENCODER_META: encoder}
            out.append((env, TaskStatus(env.id, queued, meta=meta), ttl))
        return out

    async def _publish_new(self, envelopes: Sequence[Envelope], parts: _LoopParts
                           ) -> dict[str, str]:
        """Write each envelope's ``queued`` status and publish it, skipping ids that
        already have a status: atomically where broker and backend share a store
        (:class:`~stem.ports.AtomicPublishStore`), else statuses first (see
        :func:`stem.adapters._shared.add_then_publish`).

        Unique tasks take their lock in the same step; one whose lock another task holds
        is not published, and the returned mapping gives, for each such id, the id of
        the task holding the lock (what ``enqueue`` returns instead)."""
        if signals.before_task_publish.has_receivers:
            self._signal_publish(signals.before_task_publish, envelopes, None)
        target = parts.publish_target
        if target is None:
            store = self.shared_store
            target = parts.publish_target = (
                store if isinstance(store, AtomicPublishStore) else False)
        default_ttl = self.backend.default_ttl
        substitutes: dict[str, str] = {}
        pending = list(envelopes)
        for _ in range(3):  # a lock that vanishes between two calls: try again, twice
            items = self._queued_items(pending)
            locks = self._locks_of(pending)
            if target:
                published = await target.publish_new(items, default_ttl=default_ttl,
                                                     locks=locks or None)
            else:
                published = await add_then_publish(
                    self.broker, self.backend, items, default_ttl=default_ttl,
                    locks=locks or None, lock_store=self.locks if locks else None)
            if len(published) == len(pending):
                break
            subs, retry = await self._substitutes(pending, published, locks)
            substitutes.update(subs)
            if not retry:
                break
            pending = retry
        if signals.after_task_publish.has_receivers:
            self._signal_publish(signals.after_task_publish, envelopes, substitutes)
        return substitutes

    def _signal_publish(self, signal: signals.Signal, envelopes: Sequence[Envelope],
                        subs: dict[str, str] | None) -> None:
        """``before_task_publish`` (``subs`` None) / ``after_task_publish`` per envelope."""
        for env in envelopes:
            if subs is None:
                signal.send(self, envelope=env)
            else:
                signal.send(self, envelope=env, task_id=subs.get(env.id, env.id))

    @property
    def locks(self) -> LockStore:
        """The lock store unique tasks use: the broker's store's (else the backend's)."""
        store = self.broker_store or self.backend_store
        if store is None:
            raise ConfigurationError(
                "unique tasks need a lock store, and this app's broker and backend are "
                "adapter objects: pass the broker as a URL or a store (stem.ports.Store)")
        locks = getattr(store, "locks", None)
        if not isinstance(locks, LockStore):
            raise ConfigurationError(f"{store!r} has no lock store, which unique tasks need")
        return locks

    def _publisher(self) -> _CoalescingPublisher:
        return self._parts().publisher

    # -- canvas: batches and group records (stem.canvas, docs/canvas.md) ----------------

    async def submit_batch(self, signatures: Sequence[Signature[Any]],
                           batch_id: str | None = None) -> BatchSubmission:
        """Enqueue ``signatures`` as one batch; the same ``batch_id`` again returns the
        same task ids and enqueues nothing new (see :func:`stem.canvas.submit_batch`)."""
        from stem.canvas import submit_batch

        return await submit_batch(self, signatures, batch_id)

    async def inspect_batch(self, batch_id: str) -> BatchStatus | None:
        """A batch's counts per state, failed ids and derived state (None: unknown)."""
        from stem.canvas import inspect_batch

        return await inspect_batch(self, batch_id)

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The stored record of a group, chord or batch (None: unknown or expired)."""
        store = self.backend_store
        groups = getattr(store, "groups", None) if store is not None else None
        return None if groups is None else await groups.get(group_id)

    # -- producing from sync code -------------------------------------------------------

    def enqueue_sync(
        self,
        task: str | TaskDefinition[..., Any],
        *args: Any,
        countdown: float | None = None,
        eta: datetime | None = None,
        headers: dict[str, str] | None = None,
        meta: dict[str, Any] | None = None,
        expires: float | datetime | None = None,
        ignore_result: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """:meth:`enqueue` for sync code (scripts, WSGI views, threads); returns the id.

        Runs on the app's background event loop (one thread, started on first use, closed
        at interpreter exit); any number of threads may call it at once. From async code
        it raises :class:`~stem.errors.SyncCallInLoopError`: ``await app.enqueue(...)``.
        """
        refuse_in_event_loop("app.enqueue_sync()", "app.enqueue(...)")
        return self._sync.run(functools.partial(
            self.enqueue, task, *args, countdown=countdown, eta=eta, headers=headers,
            meta=meta, expires=expires, ignore_result=ignore_result, **kwargs))

    def enqueue_call_sync(self, call: TaskCall[Any]) -> str:
        """:meth:`enqueue_call` for sync code (see :meth:`enqueue_sync`)."""
        refuse_in_event_loop("enqueue_call_sync()", "app.enqueue_call(...)")
        return self._sync.run(functools.partial(self.enqueue_call, call))

    def enqueue_many_sync(self, calls: Iterable[TaskCall[Any]]) -> list[str]:
        """:meth:`enqueue_many` for sync code (see :meth:`enqueue_sync`)."""
        refuse_in_event_loop("app.enqueue_many_sync()", "app.enqueue_many(...)")
        return self._sync.run(functools.partial(self.enqueue_many, list(calls)))

    def get_result_sync(self, task_id: str) -> TaskResult[Any] | None:
        """:meth:`get_result` for sync code (see :meth:`enqueue_sync`)."""
        refuse_in_event_loop("app.get_result_sync()", "app.get_result(...)")
        return self._sync.run(functools.partial(self.get_result, task_id))

    @overload
    def wait_sync(self, task_id: str, timeout: float | None = None, *,
                  raise_on_failure: bool = False) -> TaskResult[Any]: ...

    @overload
    def wait_sync(
        self, task_id: str, timeout: float | None = None, *, decode: Callable[[Any], R] | None,
        raise_on_failure: bool = False,
    ) -> TaskResult[R]: ...

    def wait_sync(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        decode: Callable[[Any], Any] | None = None,
        raise_on_failure: bool = False,
    ) -> TaskResult[Any]:
        """:meth:`wait` for sync code (see :meth:`enqueue_sync`)."""
        refuse_in_event_loop("wait_sync()", "app.wait(...)")
        return self._sync.run(functools.partial(
            self.wait, task_id, timeout, decode=decode, raise_on_failure=raise_on_failure))

    # -- results ------------------------------------------------------------------------

    def to_result(self, status: TaskStatus, decode: Callable[[Any], Any] | None = None
                  ) -> TaskResult[Any]:
        """Decode a stored status into a caller-facing :class:`TaskResult`."""
        value: Any = None
        if status.state.value == "succeeded":
            value = self.encoders.decode_result(
                status.payload, status.meta.get(RESULT_ENCODER_META)
            )
            # An ignored result is no value for the task's decode to convert.
            if decode is not None and not (
                    value is None and status.meta.get(META_IGNORE_RESULT) is True):
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
        """The task's current result (state ``queued`` from the moment it is accepted), or
        None if the id is unknown: never enqueued, or its status expired."""
        status = await self.backend.get(task_id)
        return None if status is None else self.to_result(status)

    # Two overloads so a plain ``await app.wait(id)`` is a TaskResult[Any] under mypy
    # --strict instead of an uninferable TaskResult[R].
    @overload
    async def wait(self, task_id: str, timeout: float | None = None, *,
                   raise_on_failure: bool = False) -> TaskResult[Any]: ...

    @overload
    async def wait(
        self, task_id: str, timeout: float | None = None, *, decode: Callable[[Any], R] | None,
        raise_on_failure: bool = False,
    ) -> TaskResult[R]: ...

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        decode: Callable[[Any], Any] | None = None,
        raise_on_failure: bool = False,
    ) -> TaskResult[Any]:
        """Wait until ``task_id`` succeeds, fails or is cancelled; WaitTimeoutError if not in time.

        With ``raise_on_failure=True`` a failed or cancelled task raises
        :class:`~stem.errors.TaskFailedError` (remote type, message and stack) instead
        of returning its result.

        Without a ``timeout`` the id must be known: every enqueue writes a ``queued``
        status before the task can run, so an id with no status at all was never
        enqueued (or its status expired) and would never finish —
        :class:`~stem.errors.TaskNotFoundError` is raised at once instead of waiting
        forever. With a ``timeout`` an unknown id is waited for, since it may still be
        enqueued (e.g. by a transaction that has not committed yet).
        """
        if timeout is None and await self.backend.get(task_id) is None:
            raise TaskNotFoundError(
                f"no task {task_id}: it was never enqueued, or its status expired (wait "
                "with a timeout to wait for an id that is still to be enqueued)")
        status = await self.backend.wait(task_id, timeout)
        if status is None:
            raise WaitTimeoutError(f"task {task_id} did not finish within {timeout} s")
        if raise_on_failure and status.state is not TaskState.SUCCEEDED:
            raise TaskFailedError(status.id, status.state, status.error)
        return self.to_result(status, decode)


class _CoalescingPublisher:
    """Batches concurrent ``enqueue`` calls into few publishes, without delaying any.

    An idle producer publishes at once. Calls made while a publish is in flight wait
    for it and then go together in the next one, so a busy service sends hundreds per
    round-trip with no timer (no "wait 5 ms to fill a batch"). Each caller gets its
    own future, so a failed batch fails exactly the callers that were in it.
    """

    def __init__(self, app: Stem, parts: _LoopParts) -> None:
        self._app = app
        self._parts = parts
        self._pending: list[tuple[Envelope, asyncio.Future[str]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, envelope: Envelope) -> str:
        """Publish one envelope; return the task id that stands for it (its own, or a
        unique task's existing one)."""
        if not self._busy:
            self._busy = True
            try:
                subs = await self._app._publish_new([envelope], self._parts)
            finally:
                self._next()
            return subs.get(envelope.id, envelope.id)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((envelope, fut))
        return await fut

    def _next(self) -> None:
        """After a publish: send what queued up meanwhile, or become idle."""
        if not self._pending:
            self._busy = False
            return
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send_then_next(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_then_next(self, batch: list[tuple[Envelope, asyncio.Future[str]]]) -> None:
        try:
            await self._send(batch)
        finally:
            self._next()

    async def _send(self, batch: list[tuple[Envelope, asyncio.Future[str]]]) -> None:
        try:
            subs = await self._app._publish_new([env for env, _ in batch], self._parts)
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
            for env, fut in batch:
                if not fut.done():
                    fut.set_result(subs.get(env.id, env.id))

    @staticmethod
    def _fail(batch: list[tuple[Envelope, asyncio.Future[str]]], exc: BaseException) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)


class _LoopParts:
    """What an app built for one event loop: a store per URL, the broker and backend
    taken from them, and the enqueue coalescer.

    Connections belong to the loop that opened them. ``arm`` ties the parts to their
    loop with an async generator that the loop finalises when it shuts down
    (``shutdown_asyncgens``, as ``asyncio.run`` and anyio do), which closes the stores
    while the loop still runs.
    """

    __slots__ = ("_guard", "backend", "broker", "publish_target", "publisher", "stores")

    def __init__(self, app: Stem) -> None:
        self.stores: dict[str, Store] = {}
        self.broker: Broker | None = None
        self.backend: ResultBackend | None = None
        #: Where publishes go: the shared store when it publishes atomically, False
        #: for the two-step path, None until the first publish decides.
        self.publish_target: AtomicPublishStore | Literal[False] | None = None
        self.publisher = _CoalescingPublisher(app, self)
        self._guard: AsyncGenerator[None, None] | None = None

    def arm(self, app: Stem, loop: asyncio.AbstractEventLoop) -> None:
        guard = _loop_guard(weakref.ref(app), loop)
        # Start it without awaiting: the loop's first-iteration hook registers it
        # now, and the body runs to its ``yield`` synchronously.
        step = guard.asend(None)
        try:
            step.send(None)
        except StopIteration:
            pass
        self._guard = guard

    def disarm(self) -> None:
        """For parts dropped without their loop: finish the guard without closing."""
        guard, self._guard = self._guard, None
        if guard is not None:
            step = guard.athrow(_Disarmed())
            try:
                step.send(None)
            except (StopIteration, StopAsyncIteration, _Disarmed):
                pass


class _Disarmed(Exception):
    pass


async def _loop_guard(app_ref: weakref.ref[Stem],
                      loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
    try:
        yield
    except _Disarmed:
        return
    except GeneratorExit:
        app = app_ref()
        if app is not None:
            await app._loop_closing(loop)
        raise


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _check_routes(routes: Mapping[str, str] | None) -> dict[str, str]:
    """Validate ``Stem(routes=...)``: task name or glob -> queue name, both non-empty str."""
    if routes is None:
        return {}
    if not isinstance(routes, Mapping):
        raise ConfigurationError(
            f"routes must be a mapping of task name or glob to queue, got "
            f"{type(routes).__name__}")
    for pattern, queue in routes.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigurationError(
                f"routes: each key must be a task name or glob (a non-empty str), got "
                f"{pattern!r}")
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(
                f"routes[{pattern!r}] must be a queue name (a non-empty str), got {queue!r}")
    return dict(routes)


def _after_fork_in_child() -> None:
    for app in list(_apps):
        app._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["Stem", "TaskContext"]
