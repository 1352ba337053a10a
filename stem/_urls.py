"""Credentials out of URLs before they are shown: the one helper for messages, reprs and the CLI.

:func:`mask_url` replaces every secret in a store URL with ``***``:

- the password of the userinfo (``redis://:pw@host``, ``postgresql://user:pw@host``,
  ``rediss://``, ``redis+sentinel://:pw@h1:26379,h2:26379/service``); the user name
  is kept, it is what tells you which login was tried;
- the value of every query parameter whose name looks like a secret (``password``,
  ``sslpassword``, ``sentinel_password``, ``token``, ``secret``, ``api_key``...).

It never raises and, for a malformed URL (a password with an unescaped ``/``, ``?``,
``#`` or ``@``), masks more rather than less: everything up to the last ``@`` that
could belong to the userinfo. The one case it cannot see is an unescaped ``&`` followed by
``name=value`` inside a query-string password (``?password=a&b=c``): that is
indistinguishable from a second parameter, so percent-encode passwords in URLs.

:func:`mask_urls_in` applies the same to every URL (and ``password=...`` pair) found in
free text such as a driver's exception message; :func:`redact` also removes the
literal secrets of a known URL from such text.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MASK", "mask_url", "mask_urls_in", "redact"]

#: What a secret is replaced with.
MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
#: Parameter names whose values are secrets (matched anywhere in the name, any case).
_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|credential|auth|api[_\-]?key|access[_\-]?key|private[_\-]?key"
    r"|^key$",
    re.IGNORECASE,
)
#: A URL inside free text (stops at whitespace, quotes and angle brackets).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")
#: ``password=value`` / ``password: value`` pairs in free text (libpq keyword DSNs, reprs).
_PAIR_IN_TEXT = re.compile(
    r"(?P<key>[\w.\-]*(?:pass|pwd|secret|token)[\w.\-]*)(?P<sep>\s*[=:]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&)}\]]+)",
    re.IGNORECASE,
)
#: Secrets shorter than this are not searched for in free text (they would match
#: ordinary characters of the message and protect nothing).
_MIN_SECRET_LEN = 3


def mask_url(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***``; never raises."""
    try:
        return _mask(url if isinstance(url, str) else str(url))
    except Exception:  # pragma: no cover - defensive: showing nothing beats leaking
        return MASK


def mask_urls_in(text: str) -> str:
    """``text`` with every URL in it masked, and ``password=...`` pairs masked; never raises."""
    try:
        text = text if isinstance(text, str) else str(text)
        text = _URL_IN_TEXT.sub(lambda m: _mask(m.group(0)), text)
        return _PAIR_IN_TEXT.sub(_mask_pair, text)
    except Exception:  # pragma: no cover - defensive
        return MASK


def redact(text: str, *urls: str) -> str:
    """``text`` (e.g. a driver's error) with URLs masked and the secrets of ``urls`` removed."""
    try:
        out = mask_urls_in(text)
        for url in urls:
            for secret in sorted(_secrets(url), key=len, reverse=True):
                if len(secret) >= _MIN_SECRET_LEN:
                    out = out.replace(secret, MASK)
        return out
    except Exception:  # pragma: no cover - defensive
        return MASK


# -- internals ----------------------------------------------------------------------------
#
# Masking works on spans of the original string: every reading of the URL that could
# put a secret somewhere contributes the spans it would hide, and the union is masked.
# A malformed URL has several readings (is a "?" in the password or the query's start?),
# so masking all of them is how nothing leaks whichever one a driver would choose.


def _mask(url: str) -> str:
    m = _SCHEME.match(url)
    if m is None or url[m.end() : m.end() + 2] != "//":
        return _apply(url, _opaque_spans(url))
    start = m.end() + 2
    spans: list[tuple[int, int]] = []
    at = url.rfind("@", start)
    if at >= 0:
        # The last "@" ends the userinfo in every reading, its first ":" starts the password.
        colon = url.find(":", start, at)
        if colon >= 0:
            spans.append((colon + 1, at))
    spans += _query_spans(url, start, at)
    return _apply(url, spans)


def _opaque_spans(url: str) -> list[tuple[int, int]]:
    """``user:pw@host``, ``scheme:user:pw@host``, ``host=h password=pw``."""
    spans: list[tuple[int, int]] = []
    at = url.rfind("@")
    if at >= 0:
        # From the first ":": in "a:b:c@h" either "b:c" or just "c" is the password.
        colon = url.find(":", 0, at)
        if colon >= 0:
            spans.append((colon + 1, at))
    spans += _query_spans(url, 0, at)
    spans += [(p.start("value"), p.end("value")) for p in _PAIR_IN_TEXT.finditer(url)]
    return spans


def _query_spans(url: str, start: int, at: int) -> list[tuple[int, int]]:
    """Secret query values, with the query read from the first "?" and from the first "?"
    after the last "@" (the fragment stays in the query: a raw "#" may be in a password)."""
    spans: list[tuple[int, int]] = []
    for q in {url.find("?", start), url.find("?", at + 1) if at >= 0 else -1}:
        if q < 0:
            continue
        in_secret = False
        pos = q + 1
        for seg in re.split(r"[&;]", url[q + 1 :]):
            key, eq, _value = seg.partition("=")
            if eq:
                in_secret = bool(_SECRET_NAME.search(unquote(key)))
                if in_secret:
                    spans.append((pos + len(key) + 1, pos + len(seg)))
            elif in_secret and seg:
                # A bare segment right after a secret is the rest of it (an unescaped "&").
                spans.append((pos, pos + len(seg)))
            pos += len(seg) + 1
    return spans


def _apply(url: str, spans: list[tuple[int, int]]) -> str:
    """``url`` with each (merged) span replaced by ``***``."""
    out: list[str] = []
    pos = 0
    for s, e in _merge(spans):
        out += [url[pos:s], MASK]
        pos = e
    out.append(url[pos:])
    return "".join(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _mask_pair(m: re.Match[str]) -> str:
    return f"{m.group('key')}{m.group('sep')}{MASK}"


def _secrets(url: str) -> set[str]:
    """The literal secrets of ``url`` (as written and percent-decoded)."""
    m = _SCHEME.match(url)
    if m is not None and url[m.end() : m.end() + 2] == "//":
        start = m.end() + 2
        at = url.rfind("@", start)
        colon = url.find(":", start, at) if at >= 0 else -1
        spans = ([(colon + 1, at)] if colon >= 0 else []) + _query_spans(url, start, at)
    else:
        spans = _opaque_spans(url)
    found = {url[s:e] for s, e in spans if e > s}
    for secret in list(found):
        found.add(unquote(secret))
        found.add(unquote(secret.replace("+", " ")))
    return found
