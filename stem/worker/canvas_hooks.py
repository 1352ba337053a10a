"""The worker's canvas follow-ups: links, the next chain step, group members and chords.

Called once per finished attempt (success or final failure; not on a retry) whose
envelope carries canvas meta (:data:`stem.canvas.CANVAS_META_KEYS`), **before** its
status is written and its delivery acked. That order is what makes follow-ups survive
a crash: until the ack, a crash brings the delivery back, and running the hook again
changes nothing —

- every follow-up's task id was fixed when the workflow was enqueued (the link entry's
  ``enqueueOptions.taskId``, the chain's step ids, the chord's callback id) and a
  publish writes a ``queued`` status only where the id has none;
- a group member's outcome is recorded under its index, first record wins;
- a chord's callback is claimed once, atomically with the completion check; a
  redelivered member that finds the group complete publishes the callback again under
  its fixed id (nothing new if the claimer got that far).

With an atomic status-and-ack store the status cannot be written before the hook and
the ack after it, so the hook goes first; a follow-up may therefore start a moment
before its parent's status reads ``succeeded`` (``app.wait(parent_id)`` still returns
the parent's final result).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from stem._canvas_keys import (  # the wire keys: the canvas itself is not imported
    CANVAS_META_KEYS,
    HEADER_CHAIN_ID,
    HEADER_CHAIN_INDEX,
    META_CHAIN,
    META_CHAIN_ID,
    META_CHAIN_INDEX,
    META_CHORD_CALLBACK,
    META_CHORD_CALLBACK_ID,
    META_CHORD_ID,
    META_GROUP_ID,
    META_GROUP_INDEX,
    META_LINK,
    META_LINK_ERROR,
    META_PARENT_ATTEMPT,
    META_PARENT_ID,
    META_ROOT_ID,
    parse_not_before,
)
from stem.encoding import ARGS_ENCODER_HEADER, ARGS_ENCODER_META
from stem.envelope import Envelope
from stem.errors import ConfigurationError
from stem.groups import GroupMember
from stem.log import get_logger
from stem.status import TaskError, TaskState, TaskStatus
from stem.task import META_IGNORE_RESULT, TaskCall
from stem.worker.processor import Failure, Outcome, Success

if TYPE_CHECKING:
    from stem.app import Stem

log = get_logger(__name__)

#: Attempts at the follow-ups before the delivery is given up (dead-lettered, with
#: the reason, so a replay runs the task and its follow-ups again).
ATTEMPTS = 6

#: Group-store calls in flight at once per event loop. A busy worker finishes hundreds
#: of members at a time; unbounded, each would take a connection of its own (Redis then
#: refuses with "too many connections"). Batching them is the next step.
GROUP_CALLS_IN_FLIGHT = 8

_NO_RESULT: Any = object()
_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


def _limit() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _limits.get(loop)
    if sem is None:
        sem = _limits[loop] = asyncio.Semaphore(GROUP_CALLS_IN_FLIGHT)
    return sem


async def _publish(app: Stem, calls: list[TaskCall[Any]]) -> None:
    """Publish follow-ups through the app's coalescing publisher (concurrent finishes
    share round trips instead of taking a connection each)."""
    if len(calls) == 1:
        await app.enqueue_call(calls[0])
    else:
        await asyncio.gather(*(app.enqueue_call(c) for c in calls))


#: The meta keys :func:`wants` looks for, as a set (one C-level test per task).
_CANVAS_KEYS = frozenset(CANVAS_META_KEYS)


def wants(env: Envelope) -> bool:
    """Whether a finished ``env`` has canvas follow-ups (a few dict lookups)."""
    meta = env.meta
    return bool(meta) and not _CANVAS_KEYS.isdisjoint(meta)


async def run(app: Stem, env: Envelope, outcome: Outcome, *, redelivered: bool) -> None:
    """Do ``env``'s follow-ups for ``outcome``, retrying store errors with backoff."""
    if not isinstance(outcome, Success | Failure):
        return
    await _retrying(env, lambda: _follow_up(app, env, outcome, redelivered))


async def _retrying(env: Envelope, step: Callable[[], Awaitable[None]]) -> None:
    """Run ``step`` (a task's follow-ups), retrying a store error with backoff up to
    ATTEMPTS times; the last error is raised."""
    delay = 0.05
    for attempt in range(ATTEMPTS):
        try:
            await step()
            return
        except Exception as exc:
            if attempt == ATTEMPTS - 1:
                raise
            log.warning("canvas.follow_up_failed", task=env.name, task_id=env.id,
                        error=repr(exc), attempt=attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _follow_up(app: Stem, env: Envelope, outcome: Success | Failure,
                     redelivered: bool) -> None:
    meta = env.meta
    calls: list[TaskCall[Any]] = []
    chain = meta.get(META_CHAIN)
    if isinstance(outcome, Success):
        value = _result_value(app, env, outcome)
        calls += [_child(app, env, e, value) for e in meta.get(META_LINK) or ()]
        if isinstance(chain, dict) and chain.get("next"):
            calls.append(_next_step(app, env, chain, value))
        if calls:
            await _publish(app, calls)
        if META_GROUP_INDEX in meta:
            async with _limit():
                await _record_member(app, env, TaskState.SUCCEEDED, value, None, redelivered)
        return
    calls += [_child(app, env, e, env.id) for e in meta.get(META_LINK_ERROR) or ()]
    if calls:
        await _publish(app, calls)
    if isinstance(chain, dict):
        await _abort_chain(app, env, chain, outcome.error)
    if META_GROUP_INDEX in meta:
        async with _limit():
            await _record_member(app, env, TaskState.FAILED, None, outcome.error, redelivered)


async def ended_unrun(app: Stem, env: Envelope, error: TaskError, *, expired: bool,
                      redelivered: bool) -> None:
    """Follow-ups of a task that ended without running: dead-lettered before its
    handler (bad arguments, unknown task, invalid envelope) or expired.

    Its chain stops and its group or chord learns it failed (a chord's callback then
    never runs and says which member failed), so no workflow waits forever on it. A
    dead-lettered task is a final failure, so its ``link_error`` runs; an expired one
    was dropped on purpose, so it does not (as a revoked one would not).
    """
    if not wants(env):
        return
    meta = env.meta

    async def step() -> None:
        if not expired:
            calls = [_child(app, env, e, env.id) for e in meta.get(META_LINK_ERROR) or ()]
            if calls:
                await _publish(app, calls)
        chain = meta.get(META_CHAIN)
        if isinstance(chain, dict):
            await _abort_chain(app, env, chain, error)
        if META_GROUP_INDEX in meta:
            async with _limit():
                await _record_member(app, env, TaskState.FAILED, None, error, redelivered)

    await _retrying(env, step)


def _result_value(app: Stem, env: Envelope, outcome: Success) -> Any:
    if outcome.payload is None and env.meta.get(META_IGNORE_RESULT) is True:
        return None
    return app.encoders.decode_result(outcome.payload, outcome.encoder_id)


def _child(app: Stem, parent: Envelope, entry: dict[str, Any], value: Any, *,
           task_id: str | None = None, meta: dict[str, Any] | None = None,
           headers: dict[str, str] | None = None) -> TaskCall[Any]:
    """The call a ``stem.link``-shaped entry describes, ``value`` given to it first
    (unless immutable), with lineage meta. Only the entry's own meta and headers are
    used (never the parent's per-call options: its deadline or retry budget are not the
    child's)."""
    definition = app.definition(str(entry["name"]))
    entry_headers = {str(k): str(v) for k, v in (entry.get("headers") or {}).items()}
    entry_meta = dict(entry.get("meta") or {})
    encoder_id = entry_headers.pop(ARGS_ENCODER_HEADER, None) or entry_meta.get(ARGS_ENCODER_META)
    entry_meta.pop(ARGS_ENCODER_META, None)  # the envelope is encoded afresh
    args = dict(app.encoders.decode_args(dict(entry.get("args") or {}), encoder_id,
                                         definition.options.args_encoder))
    if not entry.get("immutable", False) and value is not _NO_RESULT:
        name = entry.get("resultArg") or _first_param(definition)
        if name is None:
            raise ConfigurationError(
                f"task {definition.name!r}: no parameter to receive the previous result "
                "(the worker does not know its signature)")
        param = definition.signature.parameters.get(name) if definition.signature else None
        if param is not None and param.kind is param.VAR_POSITIONAL:
            args[name] = [value, *(args.get(name) or [])]
        else:
            args[name] = value
    entry_meta[META_PARENT_ID] = parent.id
    entry_meta[META_ROOT_ID] = parent.meta.get(META_ROOT_ID) or parent.id
    entry_meta[META_PARENT_ATTEMPT] = parent.attempt
    if meta:
        entry_meta.update(meta)
    if headers:
        entry_headers.update(headers)
    options = entry.get("options") or {}
    enqueue_options = entry.get("enqueueOptions") or {}
    vt_ms = options.get("visibilityTimeoutMs")
    max_retries = options.get("maxRetries")
    return TaskCall(
        definition, args,
        queue=options.get("queue"),
        priority=options.get("priority"),
        countdown=enqueue_options.get("countdown"),
        eta=parse_not_before(entry.get("notBefore")),
        headers=entry_headers,
        meta=entry_meta,
        max_retries=max_retries if type(max_retries) is int and max_retries > 0 else None,
        visibility_timeout=None if vt_ms is None else vt_ms / 1000,
        task_id=task_id or enqueue_options.get("taskId"),
    )


def _first_param(definition: Any) -> str | None:
    sig = definition.signature
    if sig is None:
        return None
    return next(iter(sig.parameters), None)


def _next_step(app: Stem, env: Envelope, chain: dict[str, Any], value: Any) -> TaskCall[Any]:
    index = int(chain["index"]) + 1
    steps = list(chain["next"])
    rest = {**chain, "index": index, "next": steps[1:]}
    return _child(app, env, steps[0], value, task_id=chain["ids"][index],
                  meta={META_CHAIN: rest, META_CHAIN_ID: chain["id"], META_CHAIN_INDEX: index},
                  headers={HEADER_CHAIN_ID: str(chain["id"]),
                           HEADER_CHAIN_INDEX: str(index)})


async def _abort_chain(app: Stem, env: Envelope, chain: dict[str, Any], error: TaskError
                       ) -> None:
    """Store the steps after the failed one as cancelled (only where they have no
    status), so a wait on any later step, or on the chain's last, ends."""
    index = int(chain["index"])
    ids = list(chain["ids"])
    why = TaskError("ChainAborted", f"step {index} of {len(ids)} (task {env.id}) failed: {error}")
    statuses = [(TaskStatus(task_id, TaskState.CANCELLED, error=why, meta={
        META_CHAIN_ID: chain["id"], META_CHAIN_INDEX: i, "stem.chain.failedIndex": index,
        "stem.chain.failedTaskId": env.id}), app.result_ttl)
        for i, task_id in enumerate(ids) if i > index]
    if statuses:
        await app.backend.add_many(statuses)


async def _record_member(app: Stem, env: Envelope, state: TaskState, value: Any,
                         error: TaskError | None, redelivered: bool) -> None:
    meta = env.meta
    group_id = str(meta.get(META_GROUP_ID))
    index = int(meta[META_GROUP_INDEX])
    groups = app.backend_store.groups  # type: ignore[union-attr]
    progress = await groups.add_result(group_id, GroupMember(index, env.id, state, value, error))
    if progress is None:
        log.warning("canvas.group_missing", group_id=group_id, task_id=env.id,
                    hint="the group record expired or was never created")
        return
    callback_id = meta.get(META_CHORD_CALLBACK_ID)
    if callback_id is None:
        return
    if state is not TaskState.SUCCEEDED:
        why = TaskError("ChordFailed", f"member {index} (task {env.id}) failed: {error}")
        await app.backend.add_many([(TaskStatus(str(callback_id), TaskState.FAILED, error=why,
                                                meta={META_CHORD_ID: group_id,
                                                      "stem.chord.failedIndex": index,
                                                      "stem.chord.failedTaskId": env.id}),
                                     app.result_ttl)])
        return
    if not progress.all_succeeded:
        return
    # Exactly one completer wins the claim. A redelivered member publishes too: the
    # claimer may have crashed between its claim and its publish, and the callback's
    # fixed id makes a second publish a no-op.
    if not (await groups.claim_callback(group_id) or redelivered):
        return
    record = await groups.get(group_id)
    if record is None:
        return
    entry = record.meta[META_CHORD_CALLBACK]
    results = [m.result for m in record.members]
    await app.enqueue_many([_child(app, env, entry, results, task_id=str(callback_id),
                                   meta={META_CHORD_ID: group_id})])
    log.info("canvas.chord_dispatched", chord_id=group_id, callback_id=callback_id,
             members=len(results))
