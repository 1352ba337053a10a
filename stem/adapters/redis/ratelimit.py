"""The Redis rate limiter: GCRA in one Lua script, one key per limit.

Key ``<ns>:ratelimit:<key>`` holds the theoretical arrival time in microseconds of the
server's clock (``TIME``), so workers on hosts with skewed clocks share one limit; it
expires when its state would be "fresh" again. One key per script call, so it is
Redis Cluster-safe. ``acquire_many`` takes several tokens in the same one call.
"""

from __future__ import annotations

from typing import Any

from stem.ports import RateLimitDecision
from stem.ratelimit import decisions

from ._connection import RedisConnector

#: ARGV: emission interval, period + max_wait (whole microseconds), count.
#: Returns {taken, start}: how many of the count got slots, and max(tat, now) - now
#: before they did (microseconds); Python turns that into the decisions.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local reach = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local taken = math.floor((now + reach - tat) / interval)
if taken > count then taken = count end
if taken <= 0 then
  return {0, tat - now}
end
local new_tat = tat + taken * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.floor((new_tat - now) / 1000) + 1000)
return {taken, tat - now}
"""


class RedisRateLimiter:
    """:class:`stem.ports.RateLimiter` on Redis (the server's clock)."""

    def __init__(self, connector: RedisConnector, *, namespace: str = "stem") -> None:
        self._conn = connector
        self._prefix = f"{namespace}:ratelimit:"
        self._script: Any = None

    def __repr__(self) -> str:
        return f"RedisRateLimiter({self._conn.settings.safe_url!r})"

    async def acquire(self, key: str, limit: int, period: float, *, max_wait: float = 0.0
                      ) -> RateLimitDecision:
        return (await self.acquire_many(key, limit, period, 1, max_wait=max_wait))[0]

    async def acquire_many(self, key: str, limit: int, period: float, count: int, *,
                           max_wait: float = 0.0) -> list[RateLimitDecision]:
        if self._script is None:
            self._script = self._conn.client.register_script(GCRA)
        interval_us = max(1, round(period * 1e6 / limit))
        taken, start_us = await self._script(
            keys=[self._prefix + key],
            args=[interval_us, round((period + max(0.0, max_wait)) * 1e6), count])
        return decisions(int(start_us) / 1e6, interval_us / 1e6, period, max_wait,
                         int(taken), count)

    async def close(self) -> None:
        """The client is the store's: forget the script handle only."""
        self._script = None
