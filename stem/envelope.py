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
from typing import Any

import orjson

from stem._time import from_iso, to_epoch, to_iso, utcnow
from stem.errors import EnvelopeDecodeError

DEFAULT_QUEUE = "default"

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
        """Encode to wire bytes."""
        try:
            return orjson.dumps(self.to_dict())
        except TypeError as exc:
            raise EnvelopeDecodeError(
                f"task {self.name!r}: arguments are not JSON-serialisable ({exc}); "
                "pass plain JSON values or configure a payload encoder"
            ) from exc

    @classmethod
    def from_dict(cls, data: Any) -> Envelope:
        """Build from a decoded wire object; raises :class:`EnvelopeDecodeError` if invalid."""
        if not isinstance(data, dict):
            raise EnvelopeDecodeError(f"envelope must be a JSON object, got {type(data).__name__}")
        try:
            name = data["name"]
            args = data.get("args") or {}
            if not isinstance(name, str) or not name:
                raise EnvelopeDecodeError("envelope 'name' must be a non-empty string")
            if not isinstance(args, dict):
                raise EnvelopeDecodeError("envelope 'args' must be a JSON object")
            headers = data.get("headers") or {}
            meta = data.get("meta") or {}
            if not isinstance(headers, dict) or not isinstance(meta, dict):
                raise EnvelopeDecodeError("envelope 'headers' and 'meta' must be JSON objects")
            enq = data.get("enqueuedAt")
            nb = data.get("notBefore")
            vt = data.get("visibilityTimeout")
            env_id = data.get("id")
            # Set difference in C: the common envelope has no unknown keys at all.
            unknown = data.keys() - _KNOWN_KEYS
            extra = {k: data[k] for k in unknown} if unknown else {}
            return cls(
                id=str(env_id) if env_id is not None else new_task_id(),
                name=name,
                args=args,
                headers=headers if _all_str(headers) else {
                    str(k): str(v) for k, v in headers.items()},
                enqueued_at=from_iso(enq) if enq else utcnow(),
                not_before=from_iso(nb) if nb else None,
                priority=int(data.get("priority") or 0),
                attempt=int(data.get("attempt") or 0),
                max_retries=int(data.get("maxRetries") or 0),
                visibility_timeout=None if vt is None else float(vt) / 1000.0,
                queue=str(data.get("queue") or DEFAULT_QUEUE),
                meta=meta,
                extra=extra,
            )
        except EnvelopeDecodeError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvelopeDecodeError(f"invalid envelope: {exc!r}") from exc

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        """Decode wire bytes; raises :class:`EnvelopeDecodeError` on anything malformed."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeDecodeError(f"envelope is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


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


def peek_task_id(raw: bytes | str) -> str | None:
    """Best-effort task id from bytes that failed to decode (so its status can say why)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return str(data["id"])
    return None
