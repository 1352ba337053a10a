"""Configuration from arguments and ``STEM_*`` environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from stem._urls import mask_url
from stem.errors import ConfigurationError

if TYPE_CHECKING:
    from stem.signing import SigningConfig
    from stem.tls import TlsConfig

#: Used when nothing is configured: one SQLite file, no server needed.
DEFAULT_URL = "sqlite:///.stem/stem.db"

#: The namespace of ``Stem()`` (no name) and of tools without an app (the Dart default).
DEFAULT_NAMESPACE = "stem"

#: Longest namespace (a Postgres identifier); see :func:`stem.adapters._shared.check_namespace`.
_MAX_NAMESPACE = 63
#: What an app name keeps when it becomes a namespace; each run of anything else is one "-".
_NOT_KEPT = re.compile(r"[^a-z0-9_-]+")


def check_namespace(namespace: str, what: str = "namespace") -> str:
    """Return ``namespace`` if every adapter accepts it, else raise ConfigurationError
    naming ``what`` (the argument or variable it came from) and the rule."""
    from stem.adapters._shared import check_namespace as check  # adapters import this module

    try:
        return check(namespace)
    except ConfigurationError as exc:
        if what == "namespace":
            raise
        raise ConfigurationError(f"{what}: {exc}") from None


def namespace_from_name(name: str) -> str:
    """The namespace an app named ``name`` uses when none is configured.

    A name that is a valid namespace already is used as it is. Otherwise: lower case;
    each run of characters outside ``a-z``, ``0-9``, ``_`` and ``-`` becomes one ``-``;
    leading ``-`` and ``_`` and trailing ``-`` are dropped; at most 63 characters
    (``"Billing API"`` -> ``billing-api``, ``"shop.tasks"`` -> ``shop-tasks``). A name
    that leaves nothing valid, and ``"__main__"`` (a script's ``__name__``, which
    differs between the producer and a worker that imports the module), raise
    ConfigurationError: pass ``namespace=``.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"app name must be a string, not {type(name).__name__}")
    if name == "__main__":
        raise ConfigurationError(
            "Stem('__main__') cannot choose a namespace: a script's __name__ is '__main__' "
            "where it runs, but the module's own name in a worker that imports it, so "
            "producer and worker would use different namespaces and never meet; name the "
            "app explicitly (e.g. Stem('billing')) or pass namespace="
        )
    from stem.adapters._shared import NAMESPACE_RULE

    try:
        return check_namespace(name)
    except ConfigurationError:
        pass
    derived = _NOT_KEPT.sub("-", name.lower()).lstrip("-_")[:_MAX_NAMESPACE].rstrip("-")
    try:
        return check_namespace(derived)
    except ConfigurationError:
        raise ConfigurationError(
            f"app name {name!r} gives no valid namespace (derived: {derived!r}); pass "
            f"namespace= ({NAMESPACE_RULE})"
        ) from None


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
    """Where each store lives. The result backend falls back to the broker URL's store.

    ``namespace`` is the one configured (``STEM_NAMESPACE``), None when unset: then an
    app derives it from its name (:meth:`namespace_for`).
    """

    broker_url: str = DEFAULT_URL
    backend_url: str | None = None
    namespace: str | None = None
    #: Payload signing (``STEM_SIGNING_*``); None: envelopes are neither signed nor checked.
    signing: SigningConfig | None = None
    #: TLS files and options for ``rediss://`` and Postgres (``STEM_TLS_*``).
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if self.namespace is not None:
            check_namespace(self.namespace)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StemConfig:
        """Read ``STEM_BROKER_URL``, ``STEM_RESULT_BACKEND_URL``, ``STEM_NAMESPACE``,
        ``STEM_SIGNING_*`` and ``STEM_TLS_*`` (a bad value raises ConfigurationError)."""
        from stem.signing import SigningConfig
        from stem.tls import TlsConfig

        e = os.environ if env is None else env
        broker = e.get("STEM_BROKER_URL") or DEFAULT_URL
        return cls(
            broker_url=check_url(broker, "STEM_BROKER_URL"),
            backend_url=_opt(e, "STEM_RESULT_BACKEND_URL"),
            namespace=_opt_namespace(e, "STEM_NAMESPACE"),
            signing=SigningConfig.from_env(e),
            tls=TlsConfig.from_env(e),
        )

    def __repr__(self) -> str:
        # URLs may hold passwords: never show them unmasked.
        backend = None if self.backend_url is None else mask_url(self.backend_url)
        return (f"StemConfig(broker_url={mask_url(self.broker_url)!r}, "
                f"backend_url={backend!r}, namespace={self.namespace!r}, "
                f"signing={self.signing!r}, tls={self.tls!r})")

    def namespace_for(self, app_name: str | None = None) -> str:
        """The namespace an app named ``app_name`` uses unless given ``namespace=``:
        the configured one, else derived from the name (:func:`namespace_from_name`),
        else (no app) :data:`DEFAULT_NAMESPACE`."""
        if self.namespace is not None:
            return self.namespace
        return DEFAULT_NAMESPACE if app_name is None else namespace_from_name(app_name)

    @property
    def resolved_backend_url(self) -> str:
        """The result backend URL (the broker's when unset)."""
        return self.backend_url or self.broker_url


def _opt_namespace(env: object, key: str) -> str | None:
    value = env.get(key) if hasattr(env, "get") else None
    return check_namespace(value, key) if value else None


def _opt(env: object, key: str) -> str | None:
    value = env.get(key) if hasattr(env, "get") else None
    return check_url(value, key) if value else None
