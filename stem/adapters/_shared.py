"""Small mechanisms several adapters need; adapter-neutral, so adapters may import it
without importing each other."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson

from stem._time import utcnow
from stem._urls import mask_url
from stem.envelope import Envelope, decode_envelope
from stem.errors import ConfigurationError
from stem.limits import (
    MAX_VISIBILITY_TIMEOUT,
    MIN_VISIBILITY_TIMEOUT,
    visibility_timeout_problem,
)
from stem.log import get_logger
from stem.ports import DEFAULT_RESULT_TTL, Broker, LockStore, ResultBackend
from stem.retry import clamp_delay
from stem.status import TaskStatus

log = get_logger(__name__)
T = TypeVar("T")

#: Every FAIR_EVERY-th multi-queue fetch starts at a later queue, so a busy first
#: queue delays the others but never starves them.
FAIR_EVERY = 4


class FairOrder:
    """The order to serve ``queues`` in on each fetch: mostly as given, sometimes rotated."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def __call__(self, queues: Sequence[str]) -> list[str]:
        order = list(dict.fromkeys(queues))
        if len(order) > 1:
            self._turn += 1
            if self._turn % FAIR_EVERY == 0:
                start = 1 + (self._turn // FAIR_EVERY) % (len(order) - 1)
                order = order[start:] + order[:start]
        return order


#: How long a cancelled fetch waits for its claim to end and be handed back before
#: it leaves the rest to a background task (a store that stopped answering must not
#: hold a cancellation up for long).
GIVE_BACK_WAIT = 5.0


async def claim_safely(
    claim: Awaitable[T],
    give_back: Callable[[T], Awaitable[object]],
    pending: set[asyncio.Task[Any]],
    *,
    abandon: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """Await ``claim`` (a step of ``fetch`` that leases messages in the store) so that
    cancelling the caller never strands what the store leased.

    The claim runs in its own task, so a cancellation cannot cut it off between the
    store leasing messages and the adapter receiving them. A cancelled caller asks
    the claim to stop waiting for work (``abandon``), waits for it to end, hands what
    it got back with ``give_back`` (a nack) and only then re-raises: once ``fetch``
    has raised CancelledError, another consumer can take those messages at once.
    After GIVE_BACK_WAIT, or when the caller is cancelled again, the hand-back goes
    on in the background, in ``pending`` (which the adapter's ``close`` awaits).
    """
    task = asyncio.ensure_future(claim)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        handback = asyncio.get_running_loop().create_task(_hand_back(task, give_back, abandon))
        pending.add(handback)
        handback.add_done_callback(pending.discard)
        try:
            await asyncio.wait((handback,), timeout=GIVE_BACK_WAIT)
        except asyncio.CancelledError:
            pass  # cancelled again: the hand-back finishes on its own
        raise


async def _hand_back(
    task: asyncio.Future[T],
    give_back: Callable[[T], Awaitable[object]],
    abandon: Callable[[], Awaitable[object]] | None,
) -> None:
    if abandon is not None:
        try:
            await abandon()
        except Exception as exc:  # the claim then ends by itself, a little later
            log.debug("broker.abandon_failed", error=repr(exc))
    try:
        claimed = await task
    except Exception:
        return  # the claim failed, and its caller is gone: nothing to hand back
    try:
        await give_back(claimed)
    except Exception as exc:
        # What the claim leased comes back when the lease expires.
        log.warning("broker.give_back_failed", error=repr(exc))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiter:
    """A one-shot wake-up armed on the running loop; :meth:`wake` is safe from any thread.

    Stores that outlive one event loop (the memory adapter, shared by a test loop
    and the sync facade's loop) never keep a loop-bound ``asyncio.Event``: each
    waiting coroutine arms its own future, and whoever changes the data wakes it.
    """

    __slots__ = ("_fut", "_thread")

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._thread = threading.get_ident()

    def wake(self) -> None:
        """Resolve the future (a no-op if already woken or its loop is gone)."""
        try:
            if threading.get_ident() == self._thread:
                _resolve(self._fut)
            else:
                self._fut.get_loop().call_soon_threadsafe(_resolve, self._fut)
        except RuntimeError:
            # The waiter's loop was closed while it waited; nobody is left to wake.
            pass

    async def wait(self, seconds: float | None) -> bool:
        """Wait until woken or ``seconds`` pass (None: forever); True when woken."""
        if self._fut.done():
            return True
        if seconds is not None and seconds <= 0:
            return False
        # asyncio.wait never cancels the future, so a late wake() stays harmless.
        await asyncio.wait((self._fut,), timeout=seconds)
        return self._fut.done()


# -- namespaces -------------------------------------------------------------------

#: The namespaces every adapter accepts (one rule for all, see docs/storage.md):
#: 1-63 characters from ``a-z``, ``0-9``, ``_`` and ``-``, starting with a letter or
#: a digit, and not with ``pg_`` (reserved by Postgres for its own schemas).
#: Each adapter uses the namespace verbatim (Postgres schema, SQLite table prefix,
#: Redis key prefix), so distinct namespaces never share storage. Lower case only:
#: SQLite table names ignore case, so ``App`` and ``app`` would share tables there.
NAMESPACE_RULE = (
    "1-63 characters from a-z, 0-9, '_' and '-', starting with a letter or a digit "
    "and not with 'pg_'"
)
_NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_namespace(namespace: str) -> str:
    """Return ``namespace``, or raise ConfigurationError saying the allowed set."""
    if (
        not isinstance(namespace, str)
        or not _NAMESPACE_RE.fullmatch(namespace)
        or namespace.startswith("pg_")
    ):
        raise ConfigurationError(
            f"namespace {namespace!r} is not allowed: use {NAMESPACE_RULE} "
            "(namespaces separate tenants, so they are used verbatim, never rewritten)"
        )
    return namespace


# -- envelope fields as stored ------------------------------------------------------

def lease_seconds(vt: float | None) -> float | None:
    """The lease length stored for an envelope's ``visibility_timeout``.

    None (and NaN) stay None, meaning the broker's default; anything else is forced
    into ``MIN_VISIBILITY_TIMEOUT..MAX_VISIBILITY_TIMEOUT``, so no stored number can
    overflow a lease computation (``now() + interval``, Lua, float to int).
    """
    if vt is None or vt != vt:
        return None
    if vt < MIN_VISIBILITY_TIMEOUT:
        return MIN_VISIBILITY_TIMEOUT
    if vt > MAX_VISIBILITY_TIMEOUT:
        return MAX_VISIBILITY_TIMEOUT
    return float(vt)


def extend_seconds(seconds: float, default: float) -> float:
    """A lease extension the stores can compute with: ``0..MAX_VISIBILITY_TIMEOUT``
    (NaN: ``default``)."""
    if seconds != seconds:
        return default
    return float(min(max(seconds, 0.0), MAX_VISIBILITY_TIMEOUT))


def check_publishable(envelopes: Iterable[Envelope]) -> None:
    """Refuse (ConfigurationError) an envelope whose visibility timeout is out of range.

    Used by ``publish``; ``publish_raw`` stores bytes as they are and clamps only the
    stored lease length (:func:`lease_seconds`), and ``retry`` clamps too, since a
    worker settling a delivery must never fail on it.
    """
    for e in envelopes:
        vt = e.visibility_timeout
        if vt is not None and not (MIN_VISIBILITY_TIMEOUT <= vt <= MAX_VISIBILITY_TIMEOUT):
            problem = visibility_timeout_problem(vt)
            raise ConfigurationError(f"task {e.name!r} (id {e.id}): {problem}")


def decode_stored(raw: bytes | str) -> tuple[Envelope | None, str | None]:
    """:func:`stem.envelope.decode_envelope` that never raises.

    Fetch paths decode every leased row; one row whose bytes make the decoder fail in
    an unexpected way must become a delivery the worker dead-letters, not an error
    that fails the whole fetch (and with it every other row, for good).
    """
    try:
        return decode_envelope(raw)
    except Exception as exc:  # a decoder bug must not block the queue
        return None, f"envelope could not be decoded: {exc!r}"


def check_no_query(url: str, what: str) -> None:
    """Refuse a query string or fragment on a URL whose adapter takes no options."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigurationError(
            f"{what} URL {mask_url(url)!r} has options but {what} takes none"
        )


async def add_then_publish(
    broker: Broker,
    backend: ResultBackend,
    items: Sequence[tuple[Envelope, TaskStatus, float | None]],
    *,
    default_ttl: float = DEFAULT_RESULT_TTL,
    locks: Mapping[str, tuple[str, float]] | None = None,
    lock_store: LockStore | None = None,
) -> set[str]:
    """``publish_new`` in two steps, for a broker and backend that share no transaction.

    Unique tasks (``locks``: id -> (lock key, seconds)) take their lock in
    ``lock_store`` first, owned by their id; one whose id already has a status or whose
    lock another task holds is skipped. A failed publish releases the locks taken.

    The statuses go first (``add_many``: only new ids are written), then the envelopes
    of the ids written. A status therefore exists before any worker can see its task,
    so a fast worker's ``running``/``succeeded`` is never overwritten by ``queued``.
    If the publish fails the statuses are deleted again, so enqueueing the same id
    again can succeed. A crash between the two steps leaves a ``queued`` status with
    no message (docs/producer.md says so); stores that share a transaction do both at
    once instead (:class:`stem.ports.AtomicPublishStore`).
    """
    taken: list[tuple[str, str]] = []  # (lock key, owner) taken here
    if locks:
        if lock_store is None:
            raise ValueError("locks given without a lock store")
        known = await backend.get_many(list(locks))
        for task_id, (key, ttl) in locks.items():
            if task_id not in known and await lock_store.acquire(key, task_id, ttl):
                taken.append((key, task_id))
        owners = {owner for _, owner in taken}
        items = [i for i in items if i[0].id not in locks or i[0].id in owners]

    async def undo(ids: Sequence[str]) -> None:
        await backend.forget_many(ids)
        for key, owner in taken:
            await lock_store.release(key, owner)  # type: ignore[union-attr]

    ttl_of = {s.id: default_ttl if ttl is None else ttl for _, s, ttl in items}
    try:
        added = await backend.add_many([(s, ttl_of[s.id]) for _, s, _ in items])
    except BaseException:
        await asyncio.shield(undo([]))
        raise
    fresh = [e for e, _, _ in items if e.id in added]
    if not fresh:
        return added
    try:
        await broker.publish(fresh)
    except BaseException:
        # Shielded: a cancelled enqueue must still not leave statuses without messages.
        await asyncio.shield(undo([e.id for e in fresh]))
        raise
    return added


def replayed(env: Envelope, delay: float | None) -> Envelope:
    """What a replayed dead letter is published as: attempt 0 (a fresh run with its whole
    retry budget), due now, or ``delay`` seconds from now (clamped to at most a year)."""
    if delay is None:
        return env.copy(attempt=0, not_before=None)
    return env.copy(attempt=0, not_before=utcnow() + timedelta(seconds=clamp_delay(delay)))


#: How long SQL stores keep dead letters (seven days, as in the Dart Stem); URL option
#: ``?dead_letter_retention=`` (seconds, or with a unit: ``12h``, ``30d``).
DEFAULT_DEAD_LETTER_RETENTION = 7 * 86_400.0
#: How often a SQL broker deletes dead letters past their retention (at most once per
#: this many seconds, when it dead-letters something or lists its dead letters).
DEAD_LETTER_SWEEP_INTERVAL = 60.0
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_retention(value: str, what: str) -> float:
    """``?dead_letter_retention=`` as seconds > 0: ``604800``, ``36h``, ``7d``..."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in ("s", "m", "h", "d") else ""
    try:
        seconds = float(text[: len(text) - len(unit)]) * _UNIT_SECONDS[unit]
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 100 * 365 * 86_400.0:  # NaN fails too
        raise ConfigurationError(
            f"{what} URL: ?dead_letter_retention={value!r} must be a duration > 0 "
            "(seconds, or with a unit: 12h, 7d)")
    return seconds


def check_max_items(max_items: int) -> int:
    """``append_meta``'s bound: a whole number of at least 1."""
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"max_items must be a whole number >= 1, got {max_items!r}")
    return max_items


def meta_appended(raw: bytes | str, key: str, item: Mapping[str, Any], max_items: int
                  ) -> bytes:
    """A stored status's JSON with ``item`` appended to the list at ``meta[key]`` (kept to
    the newest ``max_items``; a value that is not a list is replaced): what every
    backend's ``append_meta`` writes. Every other key is kept as read, unknown ones
    included, so a status written by the Dart Stem stays whole."""
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("the stored status is not a JSON object")
    meta = data.get("meta")
    if not isinstance(meta, dict):
        meta = data["meta"] = {}
    current = meta.get(key)
    items = list(current) if isinstance(current, list) else []
    items.append(dict(item))
    meta[key] = items[-max_items:]
    return orjson.dumps(data)
