"""Optional dependencies: drivers and heavy parts are extras of the ``stem-tasks`` package.

``pip install 'stem-tasks[redis]'`` (``redis[hiredis]``), ``[postgres]`` (``asyncpg``),
``[crypto]`` (``cryptography``, for :class:`stem.AesGcmPayloadEncoder`), ``[solar]``
(``astral``, solar schedules), ``[yaml]`` (``pyyaml``, YAML schedule files), ``[all]``.
A missing one is reported when it is first needed, naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from stem.errors import ConfigurationError

#: extra name -> (importable module, what it is for)
EXTRAS = {
    "redis": ("redis", "Redis URLs (redis://, rediss://, redis+sentinel://)"),
    "postgres": ("asyncpg", "Postgres URLs (postgresql://)"),
    "crypto": ("cryptography", "AesGcmPayloadEncoder"),
    "solar": ("astral", "solar schedules (sunrise, sunset, noon)"),
    "yaml": ("yaml", "YAML schedule files"),
}


class MissingExtraError(ConfigurationError, ImportError):
    """A feature needs an optional dependency that is not installed."""


def require(extra: str) -> ModuleType:
    """Import the module behind ``extra`` or raise :class:`MissingExtraError` naming it."""
    module, purpose = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} need the optional dependency {module!r}: "
            f"pip install 'stem-tasks[{extra}]'"
        ) from exc
