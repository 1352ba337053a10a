"""Payload encoders: how task arguments and results are turned into JSON and back.

Producers encode args once before publishing and record the encoder id in header
``stem-args-encoder`` and meta ``__stemArgsEncoder``; workers decode once before the
handler runs. Results are encoded once and the stored status meta carries
``__stemResultEncoder``, so any process with the same registry can decode them.

As in the Dart Stem, an envelope's ``args`` is always a JSON object, so an encoder
used for arguments must encode a mapping to a mapping. The built-in encoders
(:class:`GzipJsonPayloadEncoder`, :class:`AesGcmPayloadEncoder`) always produce a
JSON object and so work for both arguments and results.

Unlike the Dart Stem, which silently falls back to its default encoder for an id it
does not know, an unknown id is an error here: the worker dead-letters the task
with the reason instead of handing the handler undecoded data.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from stem._extras import require
from stem.errors import ConfigurationError, PayloadEncodingError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ARGS_ENCODER_HEADER = "stem-args-encoder"
ARGS_ENCODER_META = "__stemArgsEncoder"
RESULT_ENCODER_META = "__stemResultEncoder"


@runtime_checkable
class TaskPayloadEncoder(Protocol):
    """Turns values into JSON-compatible data and back; ``id`` names it on the wire.

    ``decode(encode(v))`` must give ``v`` back. ``decode`` raises (any exception;
    :class:`~stem.errors.PayloadEncodingError` preferred) on data it cannot decode.
    """

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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: Any, what: str, encoder_id: str) -> bytes:
    if not isinstance(data, str):
        raise PayloadEncodingError(
            f"payload encoder {encoder_id!r}: {what} must be a base64 string, "
            f"got {type(data).__name__}"
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadEncodingError(
            f"payload encoder {encoder_id!r}: {what} is not valid base64 ({exc})"
        ) from None


def json_default(value: Any) -> Any:
    """orjson's ``default=`` hook for Stem's payloads: a pydantic model is written as
    ``model_dump(mode="json")``; anything else orjson does not carry stays an error.

    orjson calls it only for a value it cannot encode itself, so the common payload
    never reaches it. pydantic is optional: a model can exist only once pydantic is
    imported, so it is looked up in ``sys.modules``, never imported here.
    """
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise TypeError  # orjson reports "Type is not JSON serializable: <type>"


def _dumps(value: Any, encoder_id: str) -> bytes:
    try:
        return orjson.dumps(value, default=json_default)
    except TypeError as exc:
        raise PayloadEncodingError(
            f"payload encoder {encoder_id!r}: value is not JSON-serialisable ({exc})"
        ) from exc


def _loads(raw: bytes, encoder_id: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadEncodingError(
            f"payload encoder {encoder_id!r}: decoded bytes are not JSON ({exc})"
        ) from None


def _require_map(data: Any, keys: tuple[str, ...], encoder_id: str) -> dict[str, Any]:
    if not isinstance(data, dict) or any(k not in data for k in keys):
        shape = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)}"
        raise PayloadEncodingError(
            f"payload encoder {encoder_id!r} expects a JSON object with {list(keys)}, "
            f"got {shape}"
        )
    return data


class GzipJsonPayloadEncoder:
    """Gzip-compressed JSON: ``{"gzip": "<base64 of gzip(JSON bytes)>"}``.

    Worth it for large, repetitive payloads (reports, lists of records); small ones
    grow. Decoding refuses to inflate beyond ``max_size`` bytes, so a hostile
    payload cannot exhaust a worker's memory.
    """

    def __init__(
        self, *, id: str = "gzip-json", level: int = 6, max_size: int = 64 * 1024 * 1024
    ) -> None:
        if not 0 <= level <= 9:
            raise ConfigurationError(f"gzip level must be 0-9, got {level}")
        self.id = id
        self.level = level
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"GzipJsonPayloadEncoder(id={self.id!r}, level={self.level})"

    def encode(self, value: Any) -> dict[str, str]:
        """Compress ``value``'s JSON; ``mtime=0`` keeps equal values byte-identical."""
        raw = gzip.compress(_dumps(value, self.id), compresslevel=self.level, mtime=0)
        return {"gzip": _b64(raw)}

    def decode(self, data: Any) -> Any:
        """Inflate and parse a payload written by :meth:`encode`."""
        packed = _unb64(_require_map(data, ("gzip",), self.id)["gzip"], "'gzip'", self.id)
        inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        try:
            raw = inflater.decompress(packed, self.max_size)
            if inflater.unconsumed_tail:
                raise PayloadEncodingError(
                    f"payload encoder {self.id!r}: payload inflates beyond "
                    f"max_size={self.max_size} bytes"
                )
            if not inflater.eof:
                raise PayloadEncodingError(f"payload encoder {self.id!r}: truncated gzip data")
        except zlib.error as exc:
            raise PayloadEncodingError(
                f"payload encoder {self.id!r}: not gzip data ({exc})"
            ) from None
        return _loads(raw, self.id)


class AesGcmPayloadEncoder:
    """Authenticated encryption (AES-GCM) of a value's JSON, with key rotation.

    Payload: ``{"keyId": ..., "nonce": b64, "ciphertext": b64, "mac": b64}`` — a
    fresh 96-bit nonce per value and the 128-bit GCM tag as ``mac`` (the layout of
    the Dart Stem's encrypted-payload example, plus the key id). No associated data.

    ``keys`` maps key ids to 16/24/32-byte keys. New payloads use ``primary``;
    any listed key decrypts, so rotation is: add the new key everywhere, make it
    primary, drop the old one once its payloads have expired. An unknown key id,
    a wrong key or altered data raise :class:`~stem.errors.PayloadEncodingError`.
    """

    NONCE_SIZE = 12
    TAG_SIZE = 16

    def __init__(
        self, keys: Mapping[str, bytes], *, primary: str | None = None, id: str = "aes-gcm"
    ) -> None:
        if not keys:
            raise ConfigurationError("AesGcmPayloadEncoder needs at least one key")
        if primary is None:
            if len(keys) > 1:
                raise ConfigurationError(
                    "AesGcmPayloadEncoder: with several keys, say which one encrypts "
                    "(primary=...)"
                )
            primary = next(iter(keys))
        if primary not in keys:
            raise ConfigurationError(
                f"AesGcmPayloadEncoder: primary key {primary!r} is not among the keys "
                f"{sorted(keys)}"
            )
        require("crypto")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            if not isinstance(key_id, str) or not key_id:
                raise ConfigurationError("AesGcmPayloadEncoder: key ids must be non-empty strings")
            if not isinstance(key, bytes | bytearray) or len(key) not in (16, 24, 32):
                raise ConfigurationError(
                    f"AesGcmPayloadEncoder: key {key_id!r} must be 16, 24 or 32 bytes"
                )
            self._ciphers[key_id] = AESGCM(bytes(key))
        self.id = id
        self.primary = primary

    def __repr__(self) -> str:
        # Never show key material.
        return (
            f"AesGcmPayloadEncoder(id={self.id!r}, primary={self.primary!r}, "
            f"key_ids={sorted(self._ciphers)})"
        )

    @staticmethod
    def generate_key(bits: int = 256) -> bytes:
        """A new random key (256-bit unless told otherwise)."""
        require("crypto")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return AESGCM.generate_key(bit_length=bits)

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys this encoder can decrypt with."""
        return sorted(self._ciphers)

    def encode(self, value: Any) -> dict[str, str]:
        """Encrypt ``value``'s JSON with the primary key."""
        nonce = os.urandom(self.NONCE_SIZE)
        sealed = self._ciphers[self.primary].encrypt(nonce, _dumps(value, self.id), None)
        return {
            "keyId": self.primary,
            "nonce": _b64(nonce),
            "ciphertext": _b64(sealed[: -self.TAG_SIZE]),
            "mac": _b64(sealed[-self.TAG_SIZE :]),
        }

    def decode(self, data: Any) -> Any:
        """Authenticate and decrypt a payload written by :meth:`encode` (any known key)."""
        fields = _require_map(data, ("keyId", "nonce", "ciphertext", "mac"), self.id)
        key_id = fields["keyId"]
        cipher = self._ciphers.get(key_id) if isinstance(key_id, str) else None
        if cipher is None:
            raise PayloadEncodingError(
                f"payload encoder {self.id!r}: payload was encrypted with key {key_id!r}, "
                f"which this process does not have (known: {self.key_ids})"
            )
        nonce = _unb64(fields["nonce"], "'nonce'", self.id)
        ciphertext = _unb64(fields["ciphertext"], "'ciphertext'", self.id)
        mac = _unb64(fields["mac"], "'mac'", self.id)
        if len(nonce) != self.NONCE_SIZE or len(mac) != self.TAG_SIZE:
            raise PayloadEncodingError(
                f"payload encoder {self.id!r}: nonce must be {self.NONCE_SIZE} bytes and "
                f"mac {self.TAG_SIZE} bytes"
            )
        from cryptography.exceptions import InvalidTag

        try:
            plain = cipher.decrypt(nonce, ciphertext + mac, None)
        except InvalidTag:
            raise PayloadEncodingError(
                f"payload encoder {self.id!r}: payload failed authentication with key "
                f"{key_id!r} (wrong key or tampered data)"
            ) from None
        return _loads(plain, self.id)


def _apply(enc: TaskPayloadEncoder, fn: Callable[[Any], Any], value: Any, verb: str) -> Any:
    """Run an encoder step; any failure becomes a PayloadEncodingError naming the encoder."""
    try:
        return fn(value)
    except PayloadEncodingError:
        raise
    except Exception as exc:
        raise PayloadEncodingError(
            f"payload encoder {enc.id!r} could not {verb} the task args: {exc}"
        ) from exc


class TaskPayloadEncoderRegistry:
    """Encoders by id, plus the defaults used for args and results.

    Per-task encoders (``@app.task(args_encoder=..., result_encoder=...)``) are
    registered here by the app so other processes' payloads naming them decode,
    but only that task encodes with them.
    """

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

    def __repr__(self) -> str:
        return (
            f"TaskPayloadEncoderRegistry(args={self.default_args_encoder.id!r}, "
            f"result={self.default_result_encoder.id!r}, ids={self.ids})"
        )

    @property
    def ids(self) -> list[str]:
        """Ids of every registered encoder."""
        return sorted(self._by_id)

    def register(self, encoder: TaskPayloadEncoder) -> None:
        """Make ``encoder`` resolvable by its id (a second encoder with the same id replaces it)."""
        if not isinstance(getattr(encoder, "id", None), str) or not encoder.id:
            raise ConfigurationError("payload encoders need a non-empty string 'id'")
        self._by_id[encoder.id] = encoder

    def get(self, encoder_id: str) -> TaskPayloadEncoder:
        """The encoder registered as ``encoder_id``; PayloadEncodingError if unknown."""
        try:
            return self._by_id[encoder_id]
        except (KeyError, TypeError):
            raise PayloadEncodingError(
                f"unknown payload encoder {encoder_id!r}; register it on this process's "
                f"Stem(encoders=...) (known: {self.ids})"
            ) from None

    def _resolve(
        self, encoder_id: str | None, preferred: TaskPayloadEncoder | None,
        default: TaskPayloadEncoder,
    ) -> TaskPayloadEncoder:
        # No id on the wire: the task's own encoder, else the default (as the Dart
        # worker does). The task's own encoder wins for its id even if unregistered.
        if encoder_id is None:
            return preferred or default
        if preferred is not None and preferred.id == encoder_id:
            return preferred
        return self.get(encoder_id)

    def encode_args(
        self, args: dict[str, Any], encoder: TaskPayloadEncoder | None = None
    ) -> dict[str, Any]:
        """Encode an args map with ``encoder`` (default: the registry's args encoder).

        The result must be a JSON object with string keys (the envelope's ``args``
        is always a map); anything else is a PayloadEncodingError.
        """
        enc = encoder or self.default_args_encoder
        if type(enc) is JsonPayloadEncoder:
            return args
        return _args_map(_apply(enc, enc.encode, args, "encode"), enc.id, "encode")

    def decode_args(
        self,
        args: dict[str, Any],
        encoder_id: str | None,
        preferred: TaskPayloadEncoder | None = None,
    ) -> dict[str, Any]:
        """Decode an envelope's args map; ``preferred`` is the task's own args encoder."""
        enc = self._resolve(encoder_id, preferred, self.default_args_encoder)
        if type(enc) is JsonPayloadEncoder:
            return args
        return _args_map(_apply(enc, enc.decode, args, "decode"), enc.id, "decode")

    def encode_result(
        self, value: Any, encoder: TaskPayloadEncoder | None = None
    ) -> tuple[Any, str]:
        """Encode a handler's return value; returns ``(payload, encoder_id)``.

        The payload is plain JSON values (a dataclass becomes a dict, a datetime a
        string), so every backend stores it and every reader gets the same thing; a
        value that has no JSON form is a PayloadEncodingError here, where the task
        can fail with it, rather than when the backend writes it.
        """
        enc = encoder or self.default_result_encoder
        try:
            payload = enc.encode(value)
        except PayloadEncodingError:
            raise
        except Exception as exc:
            raise PayloadEncodingError(
                f"payload encoder {enc.id!r} could not encode the task result: {exc}"
            ) from exc
        if type(enc) in _JSON_OUTPUT:
            return payload, enc.id
        return _plain_json(payload, enc.id), enc.id

    def decode_result(
        self, payload: Any, encoder_id: str | None, preferred: TaskPayloadEncoder | None = None
    ) -> Any:
        """Decode a stored result payload; ``preferred`` is the task's own result encoder."""
        enc = self._resolve(encoder_id, preferred, self.default_result_encoder)
        try:
            return enc.decode(payload)
        except PayloadEncodingError:
            raise
        except Exception as exc:
            raise PayloadEncodingError(
                f"payload encoder {enc.id!r} could not decode the task result: {exc}"
            ) from exc


#: Encoders whose output is already plain JSON (dicts of strings).
_JSON_OUTPUT = frozenset({GzipJsonPayloadEncoder, AesGcmPayloadEncoder})


def _plain_json(value: Any, encoder_id: str) -> Any:
    # Scalars that are JSON as they are skip the round trip (the common small result).
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is float:
        return value
    if kind is int and -(2**63) <= value < 2**64:  # orjson's integer range
        return value
    return _loads(_dumps(value, encoder_id), encoder_id)


def _args_map(value: Any, encoder_id: str, verb: str) -> dict[str, Any]:
    if value is None:  # the Dart worker reads a null args payload as no arguments
        return {}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    what = type(value).__name__ if not isinstance(value, dict) else "a map with non-string keys"
    raise PayloadEncodingError(
        f"payload encoder {encoder_id!r} must {verb} task args to a JSON object "
        f"(the envelope's args is always a map), got {what}"
    )


__all__ = [
    "ARGS_ENCODER_HEADER",
    "ARGS_ENCODER_META",
    "RESULT_ENCODER_META",
    "AesGcmPayloadEncoder",
    "GzipJsonPayloadEncoder",
    "JsonPayloadEncoder",
    "TaskPayloadEncoder",
    "TaskPayloadEncoderRegistry",
    "json_default",
]
