"""Redis adapters: ``redis://``, ``rediss://`` (TLS), ``redis+sentinel://`` and Redis
Cluster (``?cluster=1``).

Stem's tunables ride in the URL's query string, e.g.
``redis://localhost:6379/0?claim_interval=0.5&block_time=1&default_visibility_timeout=30``
and ``?dead_letter_max=100000`` (each queue's dead-letter stream cap) for the broker and
``?result_ttl=3600`` for the result backend. An unknown key or a bad value is a
ConfigurationError. Nothing connects until the first command; ``ping()`` reports an
unreachable server clearly.
"""

from __future__ import annotations

from stem.ports import DEFAULT_RESULT_TTL, DEFAULT_VISIBILITY_TIMEOUT

from ._connection import DEFAULT_DEAD_LETTER_MAX, RedisSettings, parse_redis_url
from .backend import RedisBackend
from .broker import DEFAULT_BLOCK_TIME, DEFAULT_CLAIM_INTERVAL, RedisBroker

__all__ = [
    "RedisBackend",
    "RedisBroker",
    "RedisSettings",
    "backend_from_url",
    "broker_from_url",
    "parse_redis_url",
]


def broker_from_url(url: str, *, namespace: str = "stem") -> RedisBroker:
    """A :class:`RedisBroker` for ``url`` (not connected yet)."""
    settings = parse_redis_url(url)
    return RedisBroker(
        settings,
        namespace=namespace,
        block_time=settings.seconds("block_time", DEFAULT_BLOCK_TIME),
        claim_interval=settings.seconds("claim_interval", DEFAULT_CLAIM_INTERVAL),
        default_visibility_timeout=settings.seconds(
            "default_visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT
        ),
        dead_letter_max=settings.count("dead_letter_max", DEFAULT_DEAD_LETTER_MAX),
    )


def backend_from_url(url: str, *, namespace: str = "stem") -> RedisBackend:
    """A :class:`RedisBackend` for ``url`` (not connected yet)."""
    settings = parse_redis_url(url)
    return RedisBackend(
        settings,
        namespace=namespace,
        default_ttl=settings.seconds("result_ttl", DEFAULT_RESULT_TTL),
    )
