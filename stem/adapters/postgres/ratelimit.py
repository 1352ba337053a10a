"""The Postgres rate limiter: GCRA in one ``INSERT ... ON CONFLICT DO UPDATE`` statement.

Table ``stem_rate_limits(key, tat)`` (migration 4) holds each key's theoretical
arrival time; the statement reads the server's clock once, advances ``tat`` only when
the request is admitted or reserved (the ``WHERE`` of ``DO UPDATE``), and returns the
new value, or, when denied, the current one to say how long to wait. Row locks make
concurrent acquirers of one key take turns; the server's clock means workers with
skewed clocks share one limit.
"""

from __future__ import annotations

from typing import Any

from stem.ports import RateLimitDecision
from stem.ratelimit import EPSILON

from ._pool import Connector

# $1 key, $2 emission interval, $3 period + max_wait - interval (seconds).
# EXCLUDED.tat is now + interval: the tat of a key with no state.
_ACQUIRE = """
WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now),
up AS (
    INSERT INTO {s}.stem_rate_limits AS r (key, tat)
    SELECT $1, c.now + make_interval(secs => $2) FROM c
    ON CONFLICT (key) DO UPDATE
       SET tat = greatest(r.tat + make_interval(secs => $2), EXCLUDED.tat)
     WHERE greatest(r.tat + make_interval(secs => $2), EXCLUDED.tat)
           <= EXCLUDED.tat + make_interval(secs => $3)
    RETURNING r.tat
)
SELECT extract(epoch FROM (SELECT tat FROM up))::float8 AS granted,
       extract(epoch FROM (SELECT tat FROM {s}.stem_rate_limits WHERE key = $1))::float8
           AS current,
       extract(epoch FROM c.now)::float8 AS now
FROM c
"""


class PostgresRateLimiter:
    """:class:`stem.ports.RateLimiter` on Postgres (the server's clock)."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._sql = _ACQUIRE.replace("{s}", connector.settings.quoted_schema)

    def __repr__(self) -> str:
        return f"PostgresRateLimiter({self._connector.settings.display!r})"

    async def acquire(self, key: str, limit: int, period: float, *, max_wait: float = 0.0
                      ) -> RateLimitDecision:
        interval = period / limit
        sql = self._sql

        async def op(conn: Any) -> Any:
            return await conn.fetchrow(sql, key, interval, period + max_wait - interval)

        # No retries through an outage: the caller decides (fail open or closed) now.
        row = await self._connector.run(op, retry=False)
        granted, current, now = row["granted"], row["current"], row["now"]
        if granted is not None:
            wait = granted - period - now
            if wait <= EPSILON:
                return RateLimitDecision(True)
            return RateLimitDecision(False, wait, reserved=True)
        # Denied; the row we read may be a moment older than the one the insert saw.
        start = now if current is None or current < now else current
        return RateLimitDecision(False, max(start + interval - period - now - max_wait,
                                            EPSILON))

    async def close(self) -> None:
        """The pool is the store's: nothing of our own to release."""
