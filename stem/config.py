"""Configuration from arguments and ``STEM_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from stem._urls import mask_url
from stem.errors import ConfigurationError

#: Used when nothing is configured: one SQLite file, no server needed.
DEFAULT_URL = "sqlite:///.stem/stem.db"

KNOWN_SCHEMES = frozenset(
    {"memory", "sqlite", "redis", "rediss", "redis+sentinel", "postgres", "postgresql"}
)


def check_url(url: str, what: str) -> str:
    """Validate a store URL's scheme; raise ConfigurationError naming ``what`` and the fix."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:  # e.g. an unclosed "[" in the host; the message is masked below
        scheme = ""
        problem = "is not a valid URL"
    else:
        problem = f"has unsupported scheme {scheme!r}"
    if scheme not in KNOWN_SCHEMES:
        raise ConfigurationError(
            f"{what} URL {mask_url(url)!r} {problem}; use one of "
            "memory://, sqlite:///path.db, redis://host:6379/0, rediss://..., "
            "redis+sentinel://..., postgresql://user@host/db"
        )
    return url


@dataclass(frozen=True, slots=True)
class StemConfig:
    """Where each store lives. Unset stores fall back to the broker URL's store."""

    broker_url: str = DEFAULT_URL
    backend_url: str | None = None
    schedule_store_url: str | None = None
    lock_store_url: str | None = None
    revoke_store_url: str | None = None
    namespace: str = "stem"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StemConfig:
        """Read ``STEM_BROKER_URL``, ``STEM_RESULT_BACKEND_URL`` and friends."""
        e = os.environ if env is None else env
        broker = e.get("STEM_BROKER_URL") or DEFAULT_URL
        return cls(
            broker_url=check_url(broker, "STEM_BROKER_URL"),
            backend_url=_opt(e, "STEM_RESULT_BACKEND_URL"),
            schedule_store_url=_opt(e, "STEM_SCHEDULE_STORE_URL"),
            lock_store_url=_opt(e, "STEM_LOCK_STORE_URL"),
            revoke_store_url=_opt(e, "STEM_REVOKE_STORE_URL"),
            namespace=e.get("STEM_NAMESPACE") or "stem",
        )

    @property
    def resolved_backend_url(self) -> str:
        """The result backend URL (the broker's when unset)."""
        return self.backend_url or self.broker_url


def _opt(env: object, key: str) -> str | None:
    value = env.get(key) if hasattr(env, "get") else None
    return check_url(value, key) if value else None
