"""The task envelope (wire format v1) and its JSON codec.

Field names and formats match the Dart Stem so both can share a broker: camelCase
keys, ISO-8601 times, ``visibilityTimeout`` in milliseconds. Keys this version
does not know are kept in :attr:`Envelope.extra` and written back unchanged.

Times we create are written as UTC with milliseconds; a time read from the wire is
written back exactly as it was read (Dart writes microseconds, and older Dart
releases local time without an offset; see :mod:`stem._time`), so an envelope that
passes through a Python worker unchanged stays byte-compatible for Dart readers.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from stem._time import from_iso, to_epoch, to_iso, utcnow
from stem.encoding import json_default
from stem.errors import ArgumentNotSerializableError, EnvelopeDecodeError, PayloadTooLargeError
from stem.limits import (
    MAX_VISIBILITY_TIMEOUT,
    MIN_VISIBILITY_TIMEOUT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    clamp_priority,
    max_payload_bytes,
    visibility_timeout_problem,
)

DEFAULT_QUEUE = "default"

#: ``attempt`` and ``maxRetries`` on the wire must be whole numbers in ``0..MAX_ATTEMPTS``;
#: an envelope outside that is dead-lettered with the reason (a retry budget beyond it
#: is clamped to it). Large enough for any real budget, small enough for every store's
#: integer column and for ``attempt + 1`` to stay a 32-bit value.
MAX_ATTEMPTS = 1_000_000

#: The payload cap in bytes, read from the environment once (see :func:`payload_limit`).
_payload_cap = 0

_KNOWN_KEYS = frozenset(
    {
        "id",
        "name",
        "args",
        "headers",
        "enqueuedAt",
        "notBefore",
        "priority",
        "attempt",
        "maxRetries",
        "visibilityTimeout",
        "queue",
        "meta",
    }
)


_random_bits = random.getrandbits  # the module generator is reseeded in forked children


def new_task_id() -> str:
    """A fresh task id: a UUID version 7 string (RFC 9562), as the Dart Stem makes them.

    48 bits of Unix milliseconds then 74 random bits: ids sort by creation time, so
    index pages in the result stores fill in order instead of splitting at random,
    and making one costs about half of ``str(uuid.uuid4())``.
    """
    ms = time.time_ns() // 1_000_000
    rand = _random_bits(74)
    value = (
        ((ms & 0xFFFF_FFFF_FFFF) << 80)
        | (0x7 << 76)  # version 7
        | ((rand >> 62) << 64)
        | (0b10 << 62)  # RFC variant
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True)
class Envelope:
    """One task message as it travels through a broker.

    ``visibility_timeout`` is in seconds here and milliseconds on the wire.
    ``priority`` is 0-9, higher runs first. ``attempt`` is 0-based.
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_task_id)
    headers: dict[str, str] = field(default_factory=dict)
    enqueued_at: datetime = field(default_factory=utcnow)
    not_before: datetime | None = None
    priority: int = 0
    attempt: int = 0
    max_retries: int = 0
    visibility_timeout: float | None = None
    queue: str = DEFAULT_QUEUE
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def not_before_epoch(self) -> float | None:
        """``not_before`` as epoch seconds (what brokers index delayed work by)."""
        return None if self.not_before is None else to_epoch(self.not_before)

    def copy(self, **changes: Any) -> Envelope:
        """A copy with ``changes`` applied; dict fields are copied, never shared."""
        base = replace(
            self,
            args=dict(self.args),
            headers=dict(self.headers),
            meta=dict(self.meta),
            extra=dict(self.extra),
        )
        return replace(base, **changes) if changes else base

    def to_dict(self) -> dict[str, Any]:
        """The wire-format JSON object."""
        out: dict[str, Any] = dict(self.extra) if self.extra else {}
        out["id"] = self.id
        out["name"] = self.name
        out["args"] = self.args
        out["headers"] = self.headers
        out["enqueuedAt"] = to_iso(self.enqueued_at)
        out["notBefore"] = None if self.not_before is None else to_iso(self.not_before)
        out["priority"] = self.priority
        out["attempt"] = self.attempt
        out["maxRetries"] = self.max_retries
        out["visibilityTimeout"] = (
            None if self.visibility_timeout is None else round(self.visibility_timeout * 1000)
        )
        out["queue"] = self.queue
        out["meta"] = self.meta
        return out

    def to_json(self) -> bytes:
        """Encode to wire bytes; PayloadTooLargeError past :func:`payload_limit`."""
        try:
            raw = orjson.dumps(self.to_dict(), default=json_default)
        except TypeError as exc:
            raise _not_serializable(self, exc) from None
        if len(raw) > (_payload_cap or payload_limit()):
            raise PayloadTooLargeError(f"task {self.name!r}: {_too_large(len(raw))}")
        return raw

    @classmethod
    def from_dict(cls, data: Any) -> Envelope:
        """Build from a decoded wire object; raises :class:`EnvelopeDecodeError` if invalid.

        Every field is checked here, once, so nothing downstream meets a value it
        cannot handle: ``id`` must be a non-empty string (an envelope without one is
        refused rather than given a fresh id nobody could look up); ``attempt`` and
        ``maxRetries`` whole numbers in ``0..MAX_ATTEMPTS``; ``visibilityTimeout``
        null or milliseconds within the lease bounds of :mod:`stem.limits`.
        ``priority`` is clamped into 0-9 (the one rule every store follows).
        """
        if not isinstance(data, dict):
            raise EnvelopeDecodeError(f"envelope must be a JSON object, got {type(data).__name__}")
        try:
            env_id = data.get("id")
            if type(env_id) is not str or not env_id:
                if env_id is None or env_id == "":
                    raise EnvelopeDecodeError("envelope has no id")
                raise EnvelopeDecodeError(
                    f"envelope 'id' must be a string, got {type(env_id).__name__}")
            name = data.get("name")
            if type(name) is not str or not name:
                raise EnvelopeDecodeError("envelope 'name' must be a non-empty string")
            args = data.get("args") or {}
            if not isinstance(args, dict):
                raise EnvelopeDecodeError("envelope 'args' must be a JSON object")
            headers = data.get("headers") or {}
            meta = data.get("meta") or {}
            if not isinstance(headers, dict) or not isinstance(meta, dict):
                raise EnvelopeDecodeError("envelope 'headers' and 'meta' must be JSON objects")
            queue = data.get("queue") or DEFAULT_QUEUE
            if type(queue) is not str:
                raise EnvelopeDecodeError(
                    f"envelope 'queue' must be a string, got {type(queue).__name__}")
            priority = data.get("priority")
            if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
                priority = 0 if priority is None else _priority(priority)
            attempt = data.get("attempt")
            if type(attempt) is not int or not 0 <= attempt <= MAX_ATTEMPTS:
                attempt = _count("attempt", attempt)
            max_retries = data.get("maxRetries")
            if type(max_retries) is not int or not 0 <= max_retries <= MAX_ATTEMPTS:
                max_retries = _count("maxRetries", max_retries)
            vt = data.get("visibilityTimeout")
            if vt is not None:
                vt = _lease_seconds(vt)
            enq = data.get("enqueuedAt")
            nb = data.get("notBefore")
            # Set difference in C: the common envelope has no unknown keys at all.
            unknown = data.keys() - _KNOWN_KEYS
            extra = {k: data[k] for k in unknown} if unknown else {}
            return cls(
                id=env_id,
                name=name,
                args=args,
                headers=headers if _all_str(headers) else {
                    str(k): str(v) for k, v in headers.items()},
                enqueued_at=from_iso(enq) if enq else utcnow(),
                not_before=from_iso(nb) if nb else None,
                priority=priority,
                attempt=attempt,
                max_retries=max_retries,
                visibility_timeout=vt,
                queue=queue,
                meta=meta,
                extra=extra,
            )
        except EnvelopeDecodeError:
            raise
        except Exception as exc:  # whatever a hostile value makes a parser raise
            raise EnvelopeDecodeError(f"invalid envelope: {_short(repr(exc))}") from exc

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        """Decode wire bytes; raises :class:`EnvelopeDecodeError` on anything malformed.

        Bytes over the payload cap (:func:`payload_limit`) raise
        :class:`~stem.errors.PayloadTooLargeError` without being parsed.
        """
        size = len(raw)
        if size > (_payload_cap or payload_limit()):
            raise PayloadTooLargeError(_too_large(size))
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeDecodeError(f"envelope is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def payload_limit() -> int:
    """The envelope size cap in bytes: ``STEM_MAX_PAYLOAD_BYTES``, else 16 MiB.

    Read from the environment once per process (the first envelope encoded or
    decoded, or a worker's start); raises ConfigurationError for a bad value.
    """
    global _payload_cap
    if not _payload_cap:
        _payload_cap = max_payload_bytes()
    return _payload_cap


def reset_payload_limit() -> None:
    """Forget the cached cap, so the next use reads ``STEM_MAX_PAYLOAD_BYTES`` again."""
    global _payload_cap
    _payload_cap = 0


def _too_large(size: int) -> str:
    return (f"envelope is {size} bytes, over the {_payload_cap or payload_limit()}-byte "
            "payload limit (STEM_MAX_PAYLOAD_BYTES)")


def _short(text: str, limit: int = 120) -> str:
    """A value shown in a reason, cut short (a hostile value may be megabytes long)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _number(value: Any) -> bool:
    return type(value) is int or type(value) is float  # bool is not a number here


def _priority(value: Any) -> int:
    """Any number clamped into 0-9 (as the Dart Stem clamps); anything else is refused."""
    if not _number(value):
        raise EnvelopeDecodeError(f"envelope 'priority' must be a number, got {_short(repr(value))}")
    if value != value:  # NaN cannot come from JSON, but a dict built in code may hold one
        return PRIORITY_MIN
    if value in (float("inf"), float("-inf")):
        return PRIORITY_MAX if value > 0 else PRIORITY_MIN
    return clamp_priority(int(value))


def _count(key: str, value: Any) -> int:
    """``attempt`` / ``maxRetries``: a whole number in ``0..MAX_ATTEMPTS`` (null is 0)."""
    if value is None:
        return 0
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise EnvelopeDecodeError(
            f"envelope {key!r} must be a whole number, got {_short(repr(value))}")
    if not 0 <= value <= MAX_ATTEMPTS:
        raise EnvelopeDecodeError(
            f"envelope {key!r} {_short(repr(value))} is outside 0..{MAX_ATTEMPTS}")
    return value


def _lease_seconds(ms: Any) -> float:
    """``visibilityTimeout`` (milliseconds) as seconds within the lease bounds, or refused."""
    if not _number(ms):
        raise EnvelopeDecodeError(
            f"envelope 'visibilityTimeout' must be milliseconds, got {_short(repr(ms))}")
    seconds: float = ms / 1000.0
    if MIN_VISIBILITY_TIMEOUT <= seconds <= MAX_VISIBILITY_TIMEOUT:
        return seconds
    raise EnvelopeDecodeError(f"envelope 'visibilityTimeout': {visibility_timeout_problem(seconds)}")


def _all_str(headers: dict[Any, Any]) -> bool:
    for v in headers.values():
        if type(v) is not str:
            return False
    return True  # JSON object keys are always strings


def decode_envelope(raw: bytes | str) -> tuple[Envelope | None, str | None]:
    """``(envelope, None)``, or ``(None, reason)`` for bytes that are not an envelope.

    What brokers hand the worker: a Delivery with no envelope and the reason, so the
    worker dead-letters it instead of anyone raising in the fetch path.
    """
    try:
        return Envelope.from_json(raw), None
    except EnvelopeDecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # never raise in a fetch path, whatever the bytes are
        return None, f"invalid envelope: {_short(repr(exc))}"


def peek_task_id(raw: bytes | str) -> str | None:
    """Best-effort task id from bytes that failed to decode (so its status can say why).

    Bytes over the payload cap are not parsed at all (None).
    """
    if len(raw) > (_payload_cap or payload_limit()):
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and type(data.get("id")) is str and data["id"]:
        return str(data["id"])
    return None


def _not_serializable(env: Envelope, exc: TypeError) -> ArgumentNotSerializableError:
    """The error for an envelope orjson refused, naming the argument at fault (the slow
    path runs only after the one encode of the common path failed)."""
    for name, value in env.args.items():
        try:
            orjson.dumps(value, default=json_default)
        except TypeError as inner:
            if isinstance(value, Decimal):
                return ArgumentNotSerializableError(
                    f"task {env.name!r}: argument {name!r} (Decimal) cannot be sent as JSON "
                    "(a JSON number would lose its exactness); pass str(value): a handler "
                    "annotated Decimal gets a Decimal back")
            return ArgumentNotSerializableError(
                f"task {env.name!r}: argument {name!r} ({type(value).__name__}) cannot be "
                f"sent as JSON ({inner}); pass JSON values (str, int, float, bool, None, "
                "list, dict; datetime, date, time, UUID, enums, dataclasses and pydantic "
                "models are converted) or give the task a payload encoder (args_encoder=...)")
    return ArgumentNotSerializableError(
        f"task {env.name!r}: the envelope cannot be sent as JSON ({exc}); headers, meta "
        "and argument names must be JSON (string keys)")
