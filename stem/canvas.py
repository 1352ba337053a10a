"""Canvas: signatures, links, chains, groups, chords and batches (docs/canvas.md).

Everything a workflow needs to go on travels with its tasks, so it survives the
producer exiting and workers crashing:

- a **link** (``stem.link`` / ``stem.linkError`` in the envelope meta, the Dart
  Stem's keys and entry shape) is enqueued by the worker that finishes the parent;
- a **chain** step's envelope carries the rest of the chain (``stem.chain``);
- a **group**'s members carry the group id and their index (``groupId``,
  ``stem.groupIndex``, header ``stem-group-id``) and the worker records each
  outcome in the :class:`~stem.ports.GroupStore`; a **chord**'s callback waits in the
  group record and is dispatched by the worker that completes the group.

Every follow-up has a task id known in advance (a UUID 5 of its parent's id, chain,
group or batch id and its position), and every publish writes a ``queued`` status
only where the id has none: a redelivered parent that enqueues its follow-ups again
publishes nothing twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import stem._canvas_keys as _keys
from stem._time import to_iso
from stem.envelope import new_task_id
from stem.errors import ConfigurationError, StemError, TaskArgumentError, WaitTimeoutError
from stem.groups import GroupRecord
from stem.status import TaskResult, TaskState
from stem.task import TaskCall, TaskDefinition

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.ports import GroupStore
    from stem.retry import RetryPolicy

R = TypeVar("R")

# -- wire keys: kept in stem._canvas_keys, which the worker reads without the canvas ----

META_LINK = _keys.META_LINK
META_LINK_ERROR = _keys.META_LINK_ERROR
META_PARENT_ID = _keys.META_PARENT_ID
META_ROOT_ID = _keys.META_ROOT_ID
META_PARENT_ATTEMPT = _keys.META_PARENT_ATTEMPT
META_CHAIN = _keys.META_CHAIN
META_CHAIN_ID = _keys.META_CHAIN_ID
META_CHAIN_INDEX = _keys.META_CHAIN_INDEX
HEADER_CHAIN_ID = _keys.HEADER_CHAIN_ID
HEADER_CHAIN_INDEX = _keys.HEADER_CHAIN_INDEX
META_GROUP_ID = _keys.META_GROUP_ID
META_GROUP_INDEX = _keys.META_GROUP_INDEX
HEADER_GROUP_ID = _keys.HEADER_GROUP_ID
META_CHORD_ID = _keys.META_CHORD_ID
META_CHORD_CALLBACK_ID = _keys.META_CHORD_CALLBACK_ID
META_CHORD_CALLBACK = _keys.META_CHORD_CALLBACK
HEADER_CHORD_ID = _keys.HEADER_CHORD_ID
META_BATCH = _keys.META_BATCH
META_BATCH_ID = _keys.META_BATCH_ID
META_BATCH_TASK_IDS = _keys.META_BATCH_TASK_IDS
CANVAS_META_KEYS = _keys.CANVAS_META_KEYS
parse_not_before = _keys.parse_not_before

_NAMESPACE = uuid.UUID("5d0c1c55-7e11-4b7e-9c0a-57e4ca4fa5e1")


def derived_id(*parts: object) -> str:
    """A task id derived from ``parts`` (UUID 5): the same parts give the same id, which
    makes re-enqueuing a follow-up a no-op (an explicit task id is an idempotency key)."""
    return str(uuid.uuid5(_NAMESPACE, ":".join(str(p) for p in parts)))


def _canvas_id(prefix: str) -> str:
    return f"{prefix}-{new_task_id()}"


_NOTHING: Any = object()


# -- signatures -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Signature(Generic[R]):
    """A task with its arguments and options, not enqueued yet: ``task.s(...)``.

    In a chain, a link or a chord callback a signature receives the previous result as
    its first argument (a chord callback: the list of member results; a ``link_error``
    callback: the failed task's id), ahead of its own arguments; an **immutable** one
    (``task.si(...)``) ignores it. ``.set(queue=..., countdown=..., ...)`` adds options
    (those of :meth:`stem.TaskCall.with_options`), ``.link(sig)`` / ``.link_error(sig)``
    callbacks. ``await sig.enqueue()`` (or ``sig.delay()``) sends it on its own.
    """

    definition: TaskDefinition[Any, R]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    immutable: bool = False
    links: tuple[Signature[Any], ...] = ()
    error_links: tuple[Signature[Any], ...] = ()

    @classmethod
    def from_call(cls, call: TaskCall[R]) -> Signature[R]:
        """An immutable signature of a typed call (``task.call(...)``), options included."""
        options = {k: getattr(call, k) for k in _CALL_OPTIONS
                   if getattr(call, k) not in (None, {})}
        return cls(call.definition, (), dict(call.args), options, immutable=True,
                   links=call.link, error_links=call.link_error)

    @property
    def name(self) -> str:
        """The task name."""
        return self.definition.name

    def __repr__(self) -> str:
        flag = "si" if self.immutable else "s"
        return f"<Signature {self.name}.{flag}{self.args!r} {dict(self.kwargs)!r}>"

    def set(
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
        retry_policy: RetryPolicy | None = None,
    ) -> Signature[R]:
        """A copy with these options (checked now, as ``TaskCall.with_options`` does)."""
        given: dict[str, Any] = {k: v for k, v in dict(
            queue=queue, priority=priority, countdown=countdown, eta=eta, headers=headers,
            meta=meta, max_retries=max_retries, time_limit=time_limit,
            soft_time_limit=soft_time_limit, visibility_timeout=visibility_timeout,
            task_id=task_id, expires=expires, ignore_result=ignore_result,
            retry_policy=retry_policy).items()
            if v is not None}
        TaskCall(self.definition, {}).with_options(**given)  # refuses bad values now
        merged = {**self.options, **given}
        for key in ("headers", "meta"):
            if key in given and key in self.options:
                merged[key] = {**self.options[key], **given[key]}
        return replace(self, options=merged)

    def link(self, *callbacks: Signature[Any]) -> Signature[R]:
        """Enqueue ``callbacks`` after this task succeeds (each gets its result first)."""
        return replace(self, links=(*self.links, *callbacks))

    def link_error(self, *callbacks: Signature[Any]) -> Signature[R]:
        """Enqueue ``callbacks`` after this task fails for good (not on a retry, revoke
        or expiry); each gets the failed task's id first."""
        return replace(self, error_links=(*self.error_links, *callbacks))

    def __or__(self, other: Signature[Any] | Chain) -> Chain:
        """``a.s() | b.s()``: a chain."""
        return chain(self, other) if isinstance(other, Signature) else chain(self, *other.steps)

    # -- building -----------------------------------------------------------------------

    def call(self, *, task_id: str | None = None) -> TaskCall[R]:
        """The call as it runs on its own (no previous result), with its options."""
        return self._with_options(
            TaskCall(self.definition, self.definition.bind(self.args, self.kwargs)), task_id)

    def _partial_call(self, receives: bool, task_id: str | None) -> tuple[TaskCall[R], str | None]:
        """The call with room for a previous result (when ``receives`` and not immutable),
        and the name of the parameter that will get it (None: the worker's first)."""
        if not receives or self.immutable:
            return self.call(task_id=task_id), None
        d = self.definition
        if d.signature is None:
            if self.args:
                raise TaskArgumentError(
                    f"task {d.name!r}: positional arguments of a signature that receives a "
                    "previous result need the task's signature; pass keyword arguments, "
                    "or declare it with params=(...)")
            return self._with_options(TaskCall(d, dict(self.kwargs)), task_id), None
        params = list(d.signature.parameters.values())
        if not params:
            raise TaskArgumentError(
                f"task {d.name!r} takes no arguments, so it cannot receive the previous "
                "result: use .si(...)")
        first = params[0]
        bound = d.bind((_Placeholder(), *self.args), self.kwargs)
        if first.kind is first.VAR_POSITIONAL:
            bound[first.name] = bound[first.name][1:]
        else:
            bound.pop(first.name, None)
        return self._with_options(TaskCall(d, bound), task_id), first.name

    def _with_options(self, call: TaskCall[R], task_id: str | None) -> TaskCall[R]:
        opts = dict(self.options)
        if task_id is not None and "task_id" not in opts:
            opts["task_id"] = task_id
        call = call.with_options(**opts) if opts else call
        if self.links or self.error_links:
            call = replace(call, link=self.links, link_error=self.error_links)
        return call

    def _app(self) -> Stem:
        app = self.definition.app
        if app is None:
            raise ConfigurationError(
                f"task {self.name!r} is not attached to an app; create it with @app.task "
                "or app.definition(...)")
        return app

    def entry(self, app: Stem, *, task_id: str, receives: bool) -> dict[str, Any]:
        """This signature as a ``stem.link`` entry (the Dart shape, plus ``immutable``,
        ``resultArg`` and the follow-up's ``taskId`` in ``enqueueOptions``)."""
        call, result_arg = self._partial_call(receives, task_id)
        countdown, eta = call.countdown, call.eta
        env = app.build_envelope(replace(call, countdown=None, eta=None))
        options: dict[str, Any] = {"queue": env.queue, "priority": env.priority,
                                   "maxRetries": env.max_retries}
        if env.visibility_timeout is not None:
            options["visibilityTimeoutMs"] = round(env.visibility_timeout * 1000)
        enqueue_options: dict[str, Any] = {"taskId": env.id}
        if countdown is not None:
            enqueue_options["countdown"] = countdown
        return {"name": env.name, "args": env.args, "headers": env.headers, "meta": env.meta,
                "options": options, "notBefore": None if eta is None else to_iso(eta),
                "enqueueOptions": enqueue_options, "immutable": not receives or self.immutable,
                "resultArg": result_arg}

    # -- sending on its own -------------------------------------------------------------

    async def enqueue(self) -> str:
        """Enqueue this signature alone (links included); returns its task id."""
        return await self._app().enqueue_call(self.call())

    def delay(self) -> str:
        """:meth:`enqueue` for sync code."""
        return self._app().enqueue_call_sync(self.call())


class _Placeholder:
    """Holds the first parameter's place while a partial signature is bound."""


_CALL_OPTIONS = ("queue", "priority", "countdown", "eta", "headers", "meta", "max_retries",
                 "time_limit", "soft_time_limit", "visibility_timeout", "task_id", "expires",
                 "ignore_result", "retry_policy")


def link_meta(app: Stem, parent_id: str, links: Sequence[Signature[Any]],
              error_links: Sequence[Signature[Any]]) -> dict[str, Any]:
    """The ``stem.link`` / ``stem.linkError`` meta of a task with these callbacks; each
    callback's task id is derived from the parent's id and its position."""
    out: dict[str, Any] = {}
    if links:
        out[META_LINK] = [s.entry(app, task_id=derived_id(parent_id, "link", i), receives=True)
                          for i, s in enumerate(links)]
    if error_links:
        out[META_LINK_ERROR] = [
            s.entry(app, task_id=derived_id(parent_id, "link-error", i), receives=True)
            for i, s in enumerate(error_links)]
    return out


def _app_of(sigs: Iterable[Signature[Any]], app: Stem | None) -> Stem:
    if app is not None:
        return app
    for s in sigs:
        return s._app()
    raise ConfigurationError("a canvas needs at least one signature")


def _result_ttl(app: Stem) -> float:
    return app.result_ttl if app.result_ttl is not None else app.backend.default_ttl


def _group_store(app: Stem) -> GroupStore:
    store = app.backend_store
    groups = getattr(store, "groups", None) if store is not None else None
    if groups is None:
        raise ConfigurationError(
            "groups, chords and batches keep their records in the result backend's store; "
            "this app's backend is an object without one: give Stem a backend URL or store")
    return groups  # type: ignore[no-any-return]


# -- waiting ----------------------------------------------------------------------------


async def _wait_all(app: Stem, task_ids: Sequence[str], timeout: float | None
                    ) -> list[TaskResult[Any]]:
    """Wait for every id (in order) within one overall ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    out: list[TaskResult[Any]] = []
    pending = list(task_ids)
    while pending:
        statuses = await app.backend.get_many(pending)
        done = [i for i in pending if i in statuses and statuses[i].state.is_terminal]
        if len(done) < len(pending):
            first = next(i for i in pending if i not in done)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await app.wait(first, left if left is not None else None)
            except WaitTimeoutError:
                raise WaitTimeoutError(
                    f"{len(pending) - len(done)} of {len(task_ids)} tasks did not finish "
                    f"within {timeout} s") from None
            continue
        out.extend(app.to_result(statuses[i]) for i in pending)
        pending = []
    return out


# -- chains -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chain:
    """``chain(a, b, c)``: run the steps one after another, each getting the previous
    result first (unless immutable); a step that fails for good stops the chain."""

    steps: tuple[Signature[Any], ...]

    def __or__(self, other: Signature[Any] | Chain) -> Chain:
        more = (other,) if isinstance(other, Signature) else other.steps
        return Chain((*self.steps, *more))

    async def enqueue(self, *, chain_id: str | None = None, app: Stem | None = None
                      ) -> ChainResult:
        """Enqueue the first step, carrying the rest; returns the chain's ids.

        The step ids are derived from ``chain_id`` (a fresh ``chain-<uuid7>`` by
        default), so enqueuing the same ``chain_id`` again publishes nothing new.
        """
        app = _app_of(self.steps, app)
        chain_id = chain_id or _canvas_id("chain")
        ids = [s.options.get("task_id") or derived_id(chain_id, i)
               for i, s in enumerate(self.steps)]
        rest = [s.entry(app, task_id=ids[i], receives=True)
                for i, s in enumerate(self.steps) if i > 0]
        first = self.steps[0].call(task_id=ids[0]).with_options(
            meta={META_CHAIN: {"id": chain_id, "index": 0, "ids": ids, "next": rest},
                  META_CHAIN_ID: chain_id, META_CHAIN_INDEX: 0},
            headers={HEADER_CHAIN_ID: chain_id, HEADER_CHAIN_INDEX: "0"})
        await app.enqueue_call(first)
        return ChainResult(app, chain_id, ids)

    def delay(self, *, chain_id: str | None = None) -> ChainResult:
        """:meth:`enqueue` for sync code."""
        app = _app_of(self.steps, None)
        return app._sync.run(lambda: self.enqueue(chain_id=chain_id, app=app))


def chain(*steps: Signature[Any]) -> Chain:
    """Steps that run one after another (see :class:`Chain`)."""
    if not steps:
        raise ConfigurationError("a chain needs at least one signature")
    return Chain(tuple(steps))


@dataclass(slots=True)
class ChainResult:
    """An enqueued chain: its id and every step's task id, known up front."""

    app: Stem
    id: str
    task_ids: list[str]

    async def wait(self, timeout: float | None = None) -> TaskResult[Any]:
        """The last step's result. When a step fails, the steps after it are stored as
        ``cancelled`` (error ``ChainAborted`` naming the step); :meth:`failed_step` says
        which one and why."""
        return await self.app.wait(self.task_ids[-1], timeout)

    async def failed_step(self) -> tuple[int, TaskResult[Any]] | None:
        """The index and result of the step that stopped the chain, if one did."""
        statuses = await self.app.backend.get_many(self.task_ids)
        for i, task_id in enumerate(self.task_ids):
            s = statuses.get(task_id)
            if s is None or s.state not in (TaskState.FAILED, TaskState.CANCELLED):
                continue
            failed_index = s.meta.get("stem.chain.failedIndex")
            if isinstance(failed_index, int) and failed_index != i:
                # Cancelled by the abort, which is written a moment before the failed
                # step's own status: wait for that one.
                failed = await self.app.wait(self.task_ids[failed_index], 30)
                return failed_index, failed
            return i, self.app.to_result(s)
        return None


# -- groups and chords ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    """``group(a, b, c)``: run the members at once; results come back in their order."""

    members: tuple[Signature[Any], ...]

    async def enqueue(self, *, group_id: str | None = None, app: Stem | None = None
                      ) -> GroupResult:
        """Create the group record and publish every member; returns the group's ids."""
        app = _app_of(self.members, app)
        group_id = group_id or _canvas_id("grp")
        ids = await _dispatch_group(app, self.members, group_id, {}, None)
        return GroupResult(app, group_id, ids)

    def delay(self, *, group_id: str | None = None) -> GroupResult:
        """:meth:`enqueue` for sync code."""
        app = _app_of(self.members, None)
        return app._sync.run(lambda: self.enqueue(group_id=group_id, app=app))


def group(*members: Signature[Any] | Iterable[Signature[Any]]) -> Group:
    """Members that run at once (see :class:`Group`); takes signatures or one iterable."""
    flat: list[Signature[Any]] = []
    for m in members:
        flat.extend([m] if isinstance(m, Signature) else m)
    if not flat:
        raise ConfigurationError("a group needs at least one signature")
    return Group(tuple(flat))


async def _dispatch_group(app: Stem, members: Sequence[Signature[Any]], group_id: str,
                          meta: dict[str, Any], callback_id: str | None) -> list[str]:
    ids = [s.options.get("task_id") or derived_id(group_id, i) for i, s in enumerate(members)]
    await _group_store(app).create(group_id, len(members), meta, _result_ttl(app))
    calls = []
    for i, s in enumerate(members):
        m: dict[str, Any] = {META_GROUP_ID: group_id, META_GROUP_INDEX: i}
        headers = {HEADER_GROUP_ID: group_id}
        if callback_id is not None:
            m[META_CHORD_ID] = group_id
            m[META_CHORD_CALLBACK_ID] = callback_id
        calls.append(s.call(task_id=ids[i]).with_options(meta=m, headers=headers))
    for start in range(0, len(calls), 1000):
        await app.enqueue_many(calls[start:start + 1000])
    return ids


@dataclass(slots=True)
class GroupResult:
    """An enqueued group: its id and the members' task ids in signature order."""

    app: Stem
    id: str
    task_ids: list[str]

    async def results(self) -> list[TaskResult[Any] | None]:
        """Each member's current result, in signature order (None: unknown id)."""
        statuses = await self.app.backend.get_many(self.task_ids)
        return [self.app.to_result(statuses[i]) if i in statuses else None
                for i in self.task_ids]

    async def counts(self) -> dict[str, int]:
        """How many members are in each state."""
        out: dict[str, int] = {}
        for r in await self.results():
            key = "unknown" if r is None else r.state.value
            out[key] = out.get(key, 0) + 1
        return out

    async def wait(self, timeout: float | None = None) -> list[TaskResult[Any]]:
        """Every member's final result, in signature order."""
        return await _wait_all(self.app, self.task_ids, timeout)

    async def record(self) -> GroupRecord | None:
        """The group's record in the group store (counters, members' outcomes)."""
        return await _group_store(self.app).get(self.id)


@dataclass(frozen=True, slots=True)
class Chord:
    """``chord(group, callback)``: the callback runs once, after every member succeeded,
    with the members' results in signature order; a member that fails for good means
    it never runs, and its result says which member failed and why."""

    header: Group
    callback: Signature[Any]

    async def enqueue(self, *, chord_id: str | None = None, app: Stem | None = None
                      ) -> ChordResult:
        """Store the callback in the group record, then publish the members."""
        app = _app_of(self.header.members, app)
        chord_id = chord_id or _canvas_id("chord")
        callback_id = self.callback.options.get("task_id") or derived_id(chord_id, "callback")
        entry = self.callback.entry(app, task_id=callback_id, receives=True)
        entry["meta"] = {**entry["meta"], META_CHORD_ID: chord_id}
        entry["headers"] = {**entry["headers"], HEADER_CHORD_ID: chord_id}
        meta = {META_CHORD_CALLBACK: entry, META_CHORD_CALLBACK_ID: callback_id}
        ids = await _dispatch_group(app, self.header.members, chord_id, meta, callback_id)
        return ChordResult(app, chord_id, ids, callback_id)

    def delay(self, *, chord_id: str | None = None) -> ChordResult:
        """:meth:`enqueue` for sync code."""
        app = _app_of(self.header.members, None)
        return app._sync.run(lambda: self.enqueue(chord_id=chord_id, app=app))


def chord(header: Group | Iterable[Signature[Any]], callback: Signature[Any]) -> Chord:
    """A group and its callback (see :class:`Chord`)."""
    return Chord(header if isinstance(header, Group) else group(header), callback)


@dataclass(slots=True)
class ChordResult(GroupResult):
    """An enqueued chord: the group's ids and the callback's task id."""

    callback_id: str = ""

    async def wait(self, timeout: float | None = None) -> list[TaskResult[Any]]:
        """Every member's final result (as :meth:`GroupResult.wait`)."""
        return await _wait_all(self.app, self.task_ids, timeout)

    async def callback_result(self, timeout: float | None = None) -> TaskResult[Any]:
        """Wait for the callback's result. If a member failed, the callback's status is
        ``failed`` with the error ``ChordFailed`` naming the member (its index and task id
        are in the meta: ``stem.chord.failedIndex``, ``stem.chord.failedTaskId``)."""
        return await self.app.wait(self.callback_id, timeout)


# -- batches ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchSubmission:
    """What :func:`submit_batch` returns: the batch id and the task ids, in order."""

    batch_id: str
    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """A batch's progress (:func:`inspect_batch`): counts per state, the failed and
    cancelled ids, and the derived state: ``pending`` (nothing finished), ``running``,
    ``succeeded``, ``failed`` or ``cancelled`` (all of them), else ``partial``."""

    batch_id: str
    state: str
    expected: int
    completed: int
    counts: dict[str, int]
    failed_task_ids: list[str]
    cancelled_task_ids: list[str]
    task_ids: list[str]

    @property
    def pending(self) -> int:
        """Tasks not finished yet."""
        return self.expected - self.completed


async def submit_batch(app: Stem, signatures: Sequence[Signature[Any]],
                       batch_id: str | None = None) -> BatchSubmission:
    """Enqueue ``signatures`` as one batch. Task ids derive from the batch id, so
    submitting the same ``batch_id`` again returns the same ids and enqueues nothing new."""
    if not signatures:
        raise ConfigurationError("a batch needs at least one signature")
    batch_id = batch_id or _canvas_id("batch")
    groups = _group_store(app)
    existing = await groups.get(batch_id)
    if existing is not None:
        if existing.meta.get(META_BATCH) is not True:
            raise StemError(f"{batch_id!r} is a group or chord, not a batch")
        return BatchSubmission(batch_id, list(existing.meta[META_BATCH_TASK_IDS]))
    ids = [s.options.get("task_id") or derived_id(batch_id, i) for i, s in enumerate(signatures)]
    meta = {META_BATCH: True, "stem.batch.createdAt": to_iso(_now()),
            "stem.batch.taskCount": len(ids), META_BATCH_TASK_IDS: ids}
    if not await groups.create(batch_id, len(ids), meta, _result_ttl(app)):
        record = await groups.get(batch_id)  # a twin submission got there first
        if record is None or record.meta.get(META_BATCH) is not True:
            raise StemError(f"{batch_id!r} is a group or chord, not a batch")
        ids = list(record.meta[META_BATCH_TASK_IDS])
    calls = [s.call(task_id=ids[i]).with_options(meta={META_BATCH_ID: batch_id})
             for i, s in enumerate(signatures)]
    for start in range(0, len(calls), 1000):
        await app.enqueue_many(calls[start:start + 1000])
    return BatchSubmission(batch_id, ids)


async def inspect_batch(app: Stem, batch_id: str) -> BatchStatus | None:
    """The batch's progress from its tasks' statuses, or None if it is unknown or expired."""
    record = await _group_store(app).get(batch_id)
    if record is None or record.meta.get(META_BATCH) is not True:
        return None
    ids = list(record.meta[META_BATCH_TASK_IDS])
    statuses = await app.backend.get_many(ids)
    counts: dict[str, int] = {}
    failed, cancelled = [], []
    for i in ids:
        s = statuses.get(i)
        state = s.state.value if s is not None else "unknown"
        counts[state] = counts.get(state, 0) + 1
        if s is not None and s.state is TaskState.FAILED:
            failed.append(i)
        elif s is not None and s.state is TaskState.CANCELLED:
            cancelled.append(i)
    done = sum(counts.get(s.value, 0) for s in TaskState if s.is_terminal)
    n = len(ids)
    if done == 0:
        state = "pending"
    elif done < n:
        state = "running"
    elif counts.get("succeeded") == n:
        state = "succeeded"
    elif len(failed) == n:
        state = "failed"
    elif len(cancelled) == n:
        state = "cancelled"
    else:
        state = "partial"
    return BatchStatus(batch_id, state, n, done, counts, failed, cancelled, ids)


def _now() -> datetime:
    from stem._time import utcnow

    return utcnow()


__all__ = [
    "BatchStatus", "BatchSubmission", "Chain", "ChainResult", "Chord", "ChordResult", "Group",
    "GroupResult", "Signature", "chain", "chord", "derived_id", "group", "inspect_batch",
    "link_meta", "submit_batch",
]
