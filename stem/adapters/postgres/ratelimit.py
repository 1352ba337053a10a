"""The Postgres rate limiter: GCRA in one ``INSERT ... ON CONFLICT DO UPDATE`` statement.

Table ``stem_rate_limits(key, tat, taken)`` (migration 4) holds each key's theoretical
arrival time (epoch seconds of the server's clock) and how many tokens the last
acquisition took. The statement reads the server's clock once, advances ``tat`` only
when at least one request gets a slot (the ``WHERE`` of ``DO UPDATE``) and returns the
new row; when none does, it returns the current ``tat`` to say how long to wait. Row
locks make concurrent acquirers of one key take turns; the server's clock means
workers with skewed clocks share one limit.
"""

from __future__ import annotations

from typing import Any

from stem.ports import RateLimitDecision
from stem.ratelimit import EPSILON, decisions, granted_count

from ._pool import Connector

# $1 key, $2 emission interval, $3 period + max_wait, $4 count, $5 how many a key with
# no state grants (count capped by the limit's reach). A fresh row is now + $5 * $2
# with taken = $5, so EXCLUDED.tat - EXCLUDED.taken * $2 is "now" in DO UPDATE.
_NOW = "(EXCLUDED.tat - EXCLUDED.taken * $2::float8)"
_START = f"greatest(r.tat, {_NOW})"
_TAKEN = f"least($4::integer, floor(({_NOW} + $3::float8 - {_START}) / $2 + {EPSILON}))::integer"
_ACQUIRE = f"""
WITH c AS MATERIALIZED (SELECT extract(epoch FROM clock_timestamp())::float8 AS now),
up AS (
    INSERT INTO {{s}}.stem_rate_limits AS r (key, tat, taken)
    SELECT $1::text, c.now + $5::integer * $2::float8, $5::integer FROM c
    ON CONFLICT (key) DO UPDATE
       SET tat = {_START} + {_TAKEN} * $2, taken = {_TAKEN}
     WHERE {_TAKEN} > 0
    RETURNING r.tat, r.taken
)
SELECT (SELECT tat FROM up) AS tat, (SELECT taken FROM up) AS taken,
       (SELECT tat FROM {{s}}.stem_rate_limits WHERE key = $1) AS current, c.now
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
        return (await self.acquire_many(key, limit, period, 1, max_wait=max_wait))[0]

    async def acquire_many(self, key: str, limit: int, period: float, count: int, *,
                           max_wait: float = 0.0) -> list[RateLimitDecision]:
        interval = period / limit
        reach = period + max(0.0, max_wait)
        fresh = granted_count(0.0, interval, reach, count)
        sql = self._sql

        async def op(conn: Any) -> Any:
            return await conn.fetchrow(sql, key, interval, reach, count, fresh)

        # No retries through an outage: the caller decides (fail open or closed) now.
        row = await self._connector.run(op, retry=False)
        now = row["now"]
        if row["tat"] is not None:
            taken = row["taken"]
            start_in = row["tat"] - taken * interval - now
            return decisions(start_in, interval, period, max_wait, taken, count)
        # None taken; the row we read may be a moment older than the one the insert saw.
        current = row["current"]
        start_in = 0.0 if current is None or current < now else current - now
        return decisions(start_in, interval, period, max_wait, 0, count)

    async def close(self) -> None:
        """The pool is the store's: nothing of our own to release."""
