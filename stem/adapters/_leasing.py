"""The :class:`stem.ports.Broker` bookkeeping written once: :class:`LeasingBroker`.

The public methods do what every broker does alike — the ``fetch`` loop up to its
deadline (arm a wake-up, claim, learn when delayed work or a lease comes due, wait
for a change), the cancellation-safe claim with its give-back, the fairness rule,
outage retries and their logging, the empty-batch short cuts of the settle calls,
the bounds on lease lengths — and an adapter fills in narrow hooks:

* ``_watch(queues, consumer, block)``: a :class:`Wakeup` for one fetch (armed by
  ``arm()`` before every claim, so a change between the claim and the wait is not
  missed);
* ``_claim(queues, n, consumer, polled)``: lease up to ``n`` from the queues, in
  that order, in one atomic store step (a Lua script, one SQL statement, one
  transaction); returns a :class:`Claim`;
* ``_next_due(queues)``: seconds until delayed work or a lease comes due (only
  asked when the claim did not already say);
* ``_wait_for_work(...)``: sleep on the wake-up (the default), or wait and claim
  in one step where the store can (Redis: a blocking XREADGROUP);
* the settle primitives ``_publish``, ``_ack``, ``_nack``, ``_retry``,
  ``_dead_letter``, ``_extend``, and ``_interrupt`` / ``_close`` for ``close``.

Each delivery carries the adapter's own typed lease (``Delivery.lease``: a small
NamedTuple such as ``SqliteLease(row_id, token)``); the settle primitives read it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from stem.adapters._shared import FairOrder, check_publishable, claim_safely, extend_seconds
from stem.envelope import Envelope, decode_envelope
from stem.errors import ServiceUnavailableError
from stem.log import get_logger
from stem.ports import Delivery

log = get_logger(__name__)

#: First pause after a failed fetch step; doubled per failure up to MAX_BACKOFF.
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 2.0
#: A wait shorter than this is not worth a sleep: claim again at once.
MIN_WAIT = 0.001


class Claim(NamedTuple):
    """What one claim leased, and (when the claim learned it for free) in how many
    seconds delayed work or an expiring lease next makes something claimable."""

    deliveries: list[Delivery]
    due_in: float | None = None


NOTHING = Claim([])


class Wakeup(Protocol):
    """One fetch's way of noticing that the queues may have changed."""

    def arm(self) -> None:
        """Start noticing changes (called before every claim)."""
        ...

    async def wait(self, seconds: float) -> bool:
        """Sleep until a change since :meth:`arm` or ``seconds``; True when woken."""
        ...

    def close(self) -> None:
        """Stop noticing changes."""
        ...


def delivery(
    queue: str,
    raw: bytes,
    receipt: str,
    lease: object,
    lease_expires_at: float | None,
    redelivered: bool,
) -> Delivery:
    """Stored bytes as a :class:`Delivery`; bytes that cannot be decoded (for whatever
    reason, even a decoder bug) become a delivery with ``decode_error`` for the worker
    to dead-letter, never an error that fails the whole fetch."""
    try:
        env, error = decode_envelope(raw)
    except Exception as exc:  # a decoder bug must not block the queue
        env, error = None, f"envelope could not be decoded: {exc!r}"
    return Delivery(env, receipt, queue, raw, lease_expires_at, error, lease, redelivered)


class LeasingBroker:
    """Base of the four built-in brokers (see the module docstring for the hooks)."""

    #: Lease length for envelopes that carry no ``visibility_timeout``.
    default_visibility_timeout: float
    #: The adapter's name in log lines.
    kind = "broker"
    #: The typed lease this adapter's deliveries carry (settle calls refuse others).
    lease_type: type = object

    def __init__(self) -> None:
        self._order = FairOrder()
        # Hand-backs of cancelled fetches (and other background work) that close awaits.
        self._background: set[asyncio.Task[Any]] = set()
        # Bumped by close: a fetch started before it returns (empty).
        self._closes = 0
        self._outage_since: float | None = None
        self._backoff = FIRST_BACKOFF

    # -- fetch ---------------------------------------------------------------------

    async def fetch(
        self, queues: Sequence[str], max_count: int, *, block: float, consumer: str
    ) -> list[Delivery]:
        """Lease up to ``max_count`` ready envelopes; see :class:`stem.ports.Broker`.

        While nothing is ready the fetch sleeps until the store announces a change,
        delayed work or a lease comes due, or ``block`` runs out. A store outage is
        retried with backoff until ``block`` runs out (logged once when it starts and
        once when it ends), then raised as ServiceUnavailableError.
        """
        if max_count <= 0 or not queues:
            return []
        order = self._order(queues)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(block, 0.0)
        closes = self._closes
        wake = await self._watch(order, consumer, block)
        polled = False
        try:
            while True:
                try:
                    wake.arm()
                    claim = await claim_safely(
                        self._claim(order, max_count, consumer, polled),
                        self._give_back,
                        self._background,
                    )
                    if self._outage_since is not None:
                        self._recovered()
                    if claim.deliveries:
                        return claim.deliveries
                    remaining = give_up - loop.time()
                    if remaining <= 0 or closes != self._closes:
                        return []
                    due = claim.due_in
                    if due is None:
                        due = await self._next_due(order)
                    seconds = remaining if due is None or due > remaining else max(due, 0.0)
                    polled = False
                    if seconds >= MIN_WAIT:
                        got = await self._wait_for_work(wake, order, max_count, consumer, seconds)
                        if isinstance(got, list):
                            if got:
                                return got
                        else:
                            polled = not got
                except ServiceUnavailableError as err:
                    self._outage(err)
                    remaining = give_up - loop.time()
                    if remaining <= 0:
                        raise
                    await asyncio.sleep(min(self._backoff, remaining))
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF)
                    # One more attempt, even when that pause used up the block.
                    continue
                if closes != self._closes or loop.time() >= give_up:
                    return []
        finally:
            wake.close()

    async def _give_back(self, claim: Claim) -> None:
        await self.nack(claim.deliveries)

    def _outage(self, err: ServiceUnavailableError) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("broker.unavailable", broker=self.kind, error=str(err))

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.info(
                "broker.reconnected",
                broker=self.kind,
                after=round(time.monotonic() - self._outage_since, 3),
            )
            self._outage_since = None
        self._backoff = FIRST_BACKOFF

    # -- publish and settle: checks and short cuts, then the adapter's primitive ----

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store envelopes (all or none checked first: a visibility timeout outside
        :mod:`stem.limits` is a ConfigurationError); nothing to store, no I/O."""
        if envelopes:
            check_publishable(envelopes)
            await self._publish(envelopes)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove delivered envelopes whose lease is still held (see the port)."""
        if deliveries:
            self._check_own(deliveries)
            await self._ack(deliveries)

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        """Give still-held leases back: the envelopes are ready again at once."""
        if deliveries:
            self._check_own(deliveries)
            await self._nack(deliveries)

    async def retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Ack each still-held delivery and store its replacement, atomically where
        the store allows; a delivery whose lease was lost gets no replacement."""
        if items:
            self._check_own([d for d, _ in items])
            await self._retry(items)

    async def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Move still-held deliveries to their queue's dead letters with a reason."""
        if items:
            self._check_own([d for d, _ in items])
            await self._dead_letter(items)

    async def extend_lease(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Set each still-held lease to end ``seconds`` from now (within
        ``0..MAX_VISIBILITY_TIMEOUT``; NaN means the default) and update
        ``lease_expires_at``; a lost lease's deadline is left alone."""
        if deliveries:
            self._check_own(deliveries)
            await self._extend(deliveries, extend_seconds(seconds, self.default_visibility_timeout))

    def _check_own(self, deliveries: Sequence[Delivery]) -> None:
        """A delivery fetched from another broker is a programming error: say so, for
        every adapter alike, instead of ignoring it like a lost lease."""
        lease_type = self.lease_type
        for d in deliveries:
            if type(d.lease) is not lease_type:
                raise TypeError(
                    f"delivery {d.receipt!r} was not fetched from this {self.kind} broker "
                    f"(its lease is {type(d.lease).__name__}, not {lease_type.__name__})")

    async def close(self) -> None:
        """End blocked fetches (they return empty), finish hand-backs, release the store."""
        self._closes += 1
        await self._interrupt()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._close()

    # -- hooks -------------------------------------------------------------------

    async def _watch(self, queues: list[str], consumer: str, block: float) -> Wakeup:
        raise NotImplementedError

    async def _claim(self, queues: list[str], max_count: int, consumer: str, polled: bool
                     ) -> Claim:
        """Lease up to ``max_count`` from ``queues`` in that order (``polled``: the
        last wait timed out without news, so a cheap look first may pay off)."""
        raise NotImplementedError

    async def _next_due(self, queues: list[str]) -> float | None:
        """Seconds until delayed work or an expiring lease makes something claimable."""
        return None

    async def _wait_for_work(
        self, wake: Wakeup, queues: list[str], max_count: int, consumer: str, seconds: float
    ) -> list[Delivery] | bool:
        """Sleep on ``wake`` for up to ``seconds``: True when woken by a change.

        A store that can wait and lease in one step returns what it leased instead
        (it must be leased as safely as a claim: see :func:`claim_safely`).
        """
        return await wake.wait(seconds)

    async def _publish(self, envelopes: Sequence[Envelope]) -> None:
        raise NotImplementedError

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        raise NotImplementedError

    async def _nack(self, deliveries: Sequence[Delivery]) -> None:
        raise NotImplementedError

    async def _retry(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        raise NotImplementedError

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        raise NotImplementedError

    async def _extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Extend still-held leases by ``seconds`` (already bounded) from now."""
        raise NotImplementedError

    async def _interrupt(self) -> None:
        """Wake every fetch blocked on this broker (close calls it)."""

    async def _close(self) -> None:
        """Release the broker's own connections."""
