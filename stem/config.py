"""Configuration from arguments and ``STEM_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from stem._urls import mask_url
from stem.errors import ConfigurationError

#: Used when nothing is configured: one SQLite file, no server needed.
DEFAULT_URL = "sqlite:///.stem/stem.db"

def check_url(url: str, what: str) -> str:
    """Validate a store URL's scheme; raise ConfigurationError naming ``what`` and the fix."""
    from stem.adapters import SCHEMES  # the one scheme list (adapters import this module)

    try:
        scheme = urlsplit(url).scheme
    except ValueError:  # e.g. an unclosed "[" in the host; the message is masked below
        scheme = ""
        problem = "is not a valid URL"
    else:
        problem = f"has unsupported scheme {scheme!r}"
    if scheme not in SCHEMES:
        examples = ", ".join(dict.fromkeys(example for _, _, example in SCHEMES.values()))
        raise ConfigurationError(f"{what} URL {mask_url(url)!r} {problem}; use one of {examples}")
    return url


@dataclass(frozen=True, slots=True)
class StemConfig:
    """Where each store lives. The result backend falls back to the broker URL's store."""

    broker_url: str = DEFAULT_URL
    backend_url: str | None = None
    namespace: str = "stem"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StemConfig:
        """Read ``STEM_BROKER_URL``, ``STEM_RESULT_BACKEND_URL`` and ``STEM_NAMESPACE``."""
        e = os.environ if env is None else env
        broker = e.get("STEM_BROKER_URL") or DEFAULT_URL
        return cls(
            broker_url=check_url(broker, "STEM_BROKER_URL"),
            backend_url=_opt(e, "STEM_RESULT_BACKEND_URL"),
            namespace=e.get("STEM_NAMESPACE") or "stem",
        )

    def __repr__(self) -> str:
        # URLs may hold passwords: never show them unmasked.
        backend = None if self.backend_url is None else mask_url(self.backend_url)
        return (f"StemConfig(broker_url={mask_url(self.broker_url)!r}, "
                f"backend_url={backend!r}, namespace={self.namespace!r})")

    @property
    def resolved_backend_url(self) -> str:
        """The result backend URL (the broker's when unset)."""
        return self.backend_url or self.broker_url


def _opt(env: object, key: str) -> str | None:
    value = env.get(key) if hasattr(env, "get") else None
    return check_url(value, key) if value else None
