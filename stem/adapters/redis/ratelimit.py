"""The Redis rate limiter: GCRA in one Lua script, one key per limit.

Key ``<ns>:ratelimit:<key>`` holds the theoretical arrival time in microseconds of the
server's clock (``TIME``), so workers on hosts with skewed clocks share one limit; it
expires when its state would be "fresh" again. One key per script call, so it is
Redis Cluster-safe.
"""

from __future__ import annotations

import math
from typing import Any

from stem.ports import RateLimitDecision

from ._connection import RedisConnector

#: ARGV: emission interval, period, max_wait (whole microseconds).
#: Returns {code, wait_us}: 1 allowed, 2 reserved (wait until the slot), 0 denied
#: (wait until asking again can succeed).
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - period - now
local code = 0
if wait <= 0 then
  code = 1
  wait = 0
elseif wait <= max_wait then
  code = 2
else
  return {0, wait - max_wait}
end
local ttl = math.floor((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return {code, wait}
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
        if self._script is None:
            self._script = self._conn.client.register_script(GCRA)
        interval_us = max(1, round(period * 1e6 / limit))
        code, wait_us = await self._script(
            keys=[self._prefix + key],
            args=[interval_us, round(period * 1e6), max(0, math.floor(max_wait * 1e6))])
        wait = int(wait_us) / 1e6
        if int(code) == 1:
            return RateLimitDecision(True)
        return RateLimitDecision(False, wait, reserved=int(code) == 2)

    async def close(self) -> None:
        """The client is the store's: forget the script handle only."""
        self._script = None
