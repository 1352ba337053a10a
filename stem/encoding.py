"""Payload encoders: how task arguments and results are turned into JSON and back.

Producers encode args once before publishing and record the encoder id in header
``stem-args-encoder`` and meta ``__stemArgsEncoder``; workers decode once before the
handler runs. Results are encoded once and the stored status meta carries
``__stemResultEncoder``, so any process with the same registry can decode them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from stem.errors import PayloadEncodingError

ARGS_ENCODER_HEADER = "stem-args-encoder"
ARGS_ENCODER_META = "__stemArgsEncoder"
RESULT_ENCODER_META = "__stemResultEncoder"
#: When an encoder turns args into something other than a JSON object, the
#: envelope's ``args`` map holds it under this key (the wire format needs a map).
WRAPPED_ARGS_KEY = "__stemPayload"


@runtime_checkable
class TaskPayloadEncoder(Protocol):
    """Turns values into JSON-compatible data and back; ``id`` names it on the wire."""

    id: str

    def encode(self, value: Any) -> Any:
        """Return a JSON-compatible representation of ``value``."""
        ...

    def decode(self, data: Any) -> Any:
        """Invert :meth:`encode`; raise on data that cannot be decoded."""
        ...


class JsonPayloadEncoder:
    """The default: values are already JSON, so they pass through unchanged."""

    id = "json"

    def encode(self, value: Any) -> Any:
        """Return ``value`` unchanged."""
        return value

    def decode(self, data: Any) -> Any:
        """Return ``data`` unchanged."""
        return data


class TaskPayloadEncoderRegistry:
    """Encoders by id, plus the defaults used for args and results."""

    def __init__(
        self,
        *,
        args_encoder: TaskPayloadEncoder | None = None,
        result_encoder: TaskPayloadEncoder | None = None,
        encoders: Iterable[TaskPayloadEncoder] = (),
    ) -> None:
        json_encoder = JsonPayloadEncoder()
        self._by_id: dict[str, TaskPayloadEncoder] = {json_encoder.id: json_encoder}
        self.default_args_encoder: TaskPayloadEncoder = args_encoder or json_encoder
        self.default_result_encoder: TaskPayloadEncoder = result_encoder or json_encoder
        for enc in (self.default_args_encoder, self.default_result_encoder, *encoders):
            self.register(enc)

    def register(self, encoder: TaskPayloadEncoder) -> None:
        """Make ``encoder`` resolvable by its id (a second encoder with the same id replaces it)."""
        if not getattr(encoder, "id", None):
            raise PayloadEncodingError("payload encoders need a non-empty 'id'")
        self._by_id[encoder.id] = encoder

    def get(self, encoder_id: str) -> TaskPayloadEncoder:
        """The encoder registered as ``encoder_id``; PayloadEncodingError if unknown."""
        try:
            return self._by_id[encoder_id]
        except KeyError:
            raise PayloadEncodingError(
                f"unknown payload encoder {encoder_id!r}; register it on this process's "
                f"Stem(encoders=...) (known: {sorted(self._by_id)})"
            ) from None

    def encode_args(self, args: dict[str, Any], encoder: TaskPayloadEncoder | None) -> dict[str, Any]:
        """Encode an args map; the result is always a JSON object."""
        enc = encoder or self.default_args_encoder
        if enc.id == "json":
            return args
        encoded = enc.encode(args)
        return encoded if isinstance(encoded, dict) else {WRAPPED_ARGS_KEY: encoded}

    def decode_args(self, args: dict[str, Any], encoder_id: str | None) -> dict[str, Any]:
        """Decode an envelope's args map written by :meth:`encode_args`."""
        if encoder_id is None or encoder_id == "json":
            return args
        enc = self.get(encoder_id)
        data: Any = args[WRAPPED_ARGS_KEY] if set(args) == {WRAPPED_ARGS_KEY} else args
        try:
            decoded = enc.decode(data)
        except PayloadEncodingError:
            raise
        except Exception as exc:
            raise PayloadEncodingError(
                f"payload encoder {encoder_id!r} could not decode the task args: {exc}"
            ) from exc
        if not isinstance(decoded, dict):
            raise PayloadEncodingError(
                f"payload encoder {encoder_id!r} decoded args to {type(decoded).__name__}, "
                "expected a mapping of argument names to values"
            )
        return decoded

    def encode_result(self, value: Any, encoder: TaskPayloadEncoder | None) -> tuple[Any, str]:
        """Encode a handler's return value; returns ``(payload, encoder_id)``."""
        enc = encoder or self.default_result_encoder
        return enc.encode(value), enc.id

    def decode_result(self, payload: Any, encoder_id: str | None) -> Any:
        """Decode a stored result payload."""
        if encoder_id is None or encoder_id == "json":
            return payload
        return self.get(encoder_id).decode(payload)
