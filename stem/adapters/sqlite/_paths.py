"""What an ``sqlite://`` URL names: the file and the dead-letter retention.

Apart from :mod:`._db` so that code which only reads such a URL (a worker showing its
broker's file) does not import :mod:`sqlite3`.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, unquote, urlsplit

from stem._urls import mask_url
from stem.adapters._shared import DEFAULT_DEAD_LETTER_RETENTION, parse_retention
from stem.errors import ConfigurationError


def path_from_url(url: str) -> str:
    """Absolute file path of ``sqlite:///relative.db`` or ``sqlite:////abs/path.db``."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {mask_url(url)!r}")
    options = parse_qsl(parts.query, keep_blank_values=True)
    if parts.fragment or any(k != "dead_letter_retention" for k, _ in options):
        raise ConfigurationError(
            f"sqlite:// URL {mask_url(url)!r} has options other than dead_letter_retention")
    if parts.netloc:
        raise ConfigurationError(
            f"SQLite URL {mask_url(url)!r} names a host; use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    # The URL path keeps one leading "/" that is not part of the file path.
    path = unquote(parts.path)[1:]
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"SQLite URL {mask_url(url)!r} needs a file (several connections share it); "
            "use sqlite:///.stem/stem.db, or memory:// for an in-process store"
        )
    return os.path.abspath(path)


def dead_letter_retention_from_url(url: str) -> float:
    """``?dead_letter_retention=`` of a ``sqlite://`` URL in seconds (default 7 days)."""
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key == "dead_letter_retention":
            return parse_retention(value, "sqlite://")
    return DEFAULT_DEAD_LETTER_RETENTION
