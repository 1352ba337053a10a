"""Payload signing: producers sign every envelope, workers verify it before using it.

Compatible with the Dart Stem: the same environment variables, the same headers
(``stem-signature``: base64 of the HMAC-SHA256 digest or the Ed25519 signature;
``stem-signature-key``: the key id) and the same *canonical string*, so an envelope
signed by a Dart producer verifies in a Python worker and back.

The canonical string is compact JSON of these fields, keys sorted (nested objects too),
non-ASCII characters written as they are::

    {"args":..,"attempt":..,"enqueuedAt":..,"headers":..,"id":..,"maxRetries":..,
     "meta":..,"name":..,"notBefore":..,"priority":..,"queue":..,"visibilityTimeoutMs":..}

``headers`` leaves out the two signature headers; times are UTC with milliseconds,
followed by three more digits when the microseconds are not zero, and ``Z``
(``2025-01-02T03:04:05.678Z``, ``2025-01-02T03:04:05.678901Z``); numbers are written as
the Dart ``toString`` writes them (``1.0``, ``1e+21``, ``1e-7``);
``visibilityTimeoutMs`` is milliseconds or null. It covers what decides how a task
runs; keys of the envelope that are not in the list are not signed.

Cryptography comes from the ``cryptography`` package (``pip install
'stem-tasks[crypto]'``). Key material never appears in a message, a ``repr`` or a log.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any, Final

import orjson

from stem._extras import require
from stem._time import WireTime, to_iso
from stem.errors import ConfigurationError

if TYPE_CHECKING:
    from stem.envelope import Envelope

SIGNATURE_HEADER: Final = "stem-signature"
SIGNATURE_KEY_HEADER: Final = "stem-signature-key"
#: The dead-letter reason and the ``security`` status meta of a rejected envelope.
SIGNATURE_INVALID: Final = "signature-invalid"

HMAC_SHA256: Final = "hmac-sha256"
ED25519: Final = "ed25519"
ALGORITHMS: Final = (HMAC_SHA256, ED25519)

ENV_ALGORITHM: Final = "STEM_SIGNING_ALGORITHM"
ENV_KEYS: Final = "STEM_SIGNING_KEYS"
ENV_PUBLIC_KEYS: Final = "STEM_SIGNING_PUBLIC_KEYS"
ENV_PRIVATE_KEYS: Final = "STEM_SIGNING_PRIVATE_KEYS"
ENV_ACTIVE_KEY: Final = "STEM_SIGNING_ACTIVE_KEY"

_ED25519_KEY_BYTES = 32


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class SigningConfig:
    """Which keys sign and which verify.

    - ``algorithm``: ``"hmac-sha256"`` (default) or ``"ed25519"``.
    - ``keys``: HMAC secrets by key id (raw bytes; 32 random bytes is a good secret).
    - ``public_keys`` / ``private_keys``: Ed25519 keys by key id, 32 raw bytes each
      (the private key is the seed). A worker that only verifies needs the public keys
      alone; signing needs the active key's private and public key.
    - ``active_key``: the key id producers sign with. Every configured key verifies, so
      keys can be rotated without rejecting work in flight (docs/security.md).

    The constructor checks everything and raises :class:`~stem.errors.ConfigurationError`
    saying what to fix. :meth:`from_env` reads the ``STEM_SIGNING_*`` variables.
    """

    algorithm: str = HMAC_SHA256
    keys: Mapping[str, bytes] = field(default_factory=dict)
    public_keys: Mapping[str, bytes] = field(default_factory=dict)
    private_keys: Mapping[str, bytes] = field(default_factory=dict)
    active_key: str | None = None

    def __post_init__(self) -> None:
        algorithm = self.algorithm.strip().lower() if isinstance(self.algorithm, str) else ""
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"signing: unknown algorithm {self.algorithm!r} ({ENV_ALGORITHM}); "
                f"use {' or '.join(ALGORITHMS)}")
        object.__setattr__(self, "algorithm", algorithm)
        for name in ("keys", "public_keys", "private_keys"):
            object.__setattr__(self, name, _check_keys(name, getattr(self, name)))
        active = self.active_key
        if active is not None and (not isinstance(active, str) or not active.strip()):
            raise ConfigurationError(
                f"signing: the active key ({ENV_ACTIVE_KEY}, active_key=) must be a key id")
        if active is not None:
            object.__setattr__(self, "active_key", active.strip())
        if algorithm == HMAC_SHA256:
            self._check_hmac()
        else:
            self._check_ed25519()

    def _check_hmac(self) -> None:
        if self.public_keys or self.private_keys:
            raise ConfigurationError(
                f"signing: {ENV_PUBLIC_KEYS} / {ENV_PRIVATE_KEYS} (public_keys=, "
                f"private_keys=) are Ed25519 keys; set {ENV_ALGORITHM}=ed25519 to use them, "
                f"or give HMAC secrets in {ENV_KEYS} (keys=)")
        if not self.keys:
            raise ConfigurationError(
                f"signing: hmac-sha256 needs at least one secret in {ENV_KEYS} (keys=), "
                "as keyId:base64secret")
        for key_id, secret in self.keys.items():
            if not secret:
                raise ConfigurationError(
                    f"signing: the HMAC secret of key {key_id!r} is empty ({ENV_KEYS})")
        if self.active_key is None:
            raise ConfigurationError(
                f"signing: missing {ENV_ACTIVE_KEY} (active_key=): name the key id of "
                f"{ENV_KEYS} that producers sign with (one of {_ids(self.keys)})")
        if self.active_key not in self.keys:
            raise ConfigurationError(
                f"signing: the active key {self.active_key!r} ({ENV_ACTIVE_KEY}) is not "
                f"in {ENV_KEYS} (keys=), which has {_ids(self.keys)}")

    def _check_ed25519(self) -> None:
        if self.keys:
            raise ConfigurationError(
                f"signing: {ENV_KEYS} (keys=) holds HMAC secrets, but {ENV_ALGORITHM} is "
                f"ed25519; give {ENV_PUBLIC_KEYS} and {ENV_PRIVATE_KEYS} instead, or use "
                "hmac-sha256")
        for name, env_name, keys in (("public_keys", ENV_PUBLIC_KEYS, self.public_keys),
                                     ("private_keys", ENV_PRIVATE_KEYS, self.private_keys)):
            for key_id, raw in keys.items():
                if len(raw) != _ED25519_KEY_BYTES:
                    raise ConfigurationError(
                        f"signing: Ed25519 key {key_id!r} in {env_name} ({name}=) is "
                        f"{len(raw)} bytes; it must be {_ED25519_KEY_BYTES} raw bytes "
                        "(base64 in the variable)")
        if not self.public_keys:
            raise ConfigurationError(
                f"signing: ed25519 needs the public keys in {ENV_PUBLIC_KEYS} "
                "(public_keys=), as keyId:base64key; workers verify with them")
        if self.private_keys and self.active_key is None:
            raise ConfigurationError(
                f"signing: {ENV_PRIVATE_KEYS} is set but {ENV_ACTIVE_KEY} (active_key=) is "
                f"not: name the key producers sign with (one of {_ids(self.private_keys)})")
        active = self.active_key
        if active is None:
            return  # verify-only
        if active not in self.public_keys:
            raise ConfigurationError(
                f"signing: the active key {active!r} ({ENV_ACTIVE_KEY}) is not in "
                f"{ENV_PUBLIC_KEYS} (public_keys=), which has {_ids(self.public_keys)}")
        if self.private_keys and active not in self.private_keys:
            raise ConfigurationError(
                f"signing: the active key {active!r} ({ENV_ACTIVE_KEY}) is not in "
                f"{ENV_PRIVATE_KEYS} (private_keys=), which has {_ids(self.private_keys)}")
        crypto = _ed25519()
        for key_id, seed in self.private_keys.items():
            public = crypto.Ed25519PrivateKey.from_private_bytes(seed).public_key()
            if key_id in self.public_keys and _raw_public(public) != self.public_keys[key_id]:
                raise ConfigurationError(
                    f"signing: the private and public Ed25519 keys of {key_id!r} do not "
                    f"belong together ({ENV_PRIVATE_KEYS} / {ENV_PUBLIC_KEYS})")

    @property
    def can_sign(self) -> bool:
        """True when this configuration has the active key's secret (it can sign)."""
        if self.active_key is None:
            return False
        if self.algorithm == HMAC_SHA256:
            return True
        return self.active_key in self.private_keys

    @property
    def key_ids(self) -> list[str]:
        """The key ids that verify, sorted."""
        return sorted(self.keys if self.algorithm == HMAC_SHA256 else self.public_keys)

    def __repr__(self) -> str:
        # Key ids only: never key material.
        private = f", private_keys={sorted(self.private_keys)}" if self.private_keys else ""
        return (f"SigningConfig(algorithm={self.algorithm!r}, key_ids={self.key_ids}"
                f"{private}, active_key={self.active_key!r})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SigningConfig | None:
        """Read the ``STEM_SIGNING_*`` variables; None when no key is set (no signing).

        ``STEM_SIGNING_KEYS`` (HMAC), ``STEM_SIGNING_PUBLIC_KEYS`` and
        ``STEM_SIGNING_PRIVATE_KEYS`` (Ed25519) are comma-separated ``keyId:base64``
        lists; ``STEM_SIGNING_ACTIVE_KEY`` the key id to sign with;
        ``STEM_SIGNING_ALGORITHM`` ``hmac-sha256`` (default) or ``ed25519``.
        """
        e = os.environ if env is None else env
        keys = _parse_key_list(ENV_KEYS, e.get(ENV_KEYS, ""))
        public = _parse_key_list(ENV_PUBLIC_KEYS, e.get(ENV_PUBLIC_KEYS, ""))
        private = _parse_key_list(ENV_PRIVATE_KEYS, e.get(ENV_PRIVATE_KEYS, ""))
        if not (keys or public or private):
            return None
        return cls(
            algorithm=e.get(ENV_ALGORITHM, "").strip() or HMAC_SHA256,
            keys=keys,
            public_keys=public,
            private_keys=private,
            active_key=e.get(ENV_ACTIVE_KEY, "").strip() or None,
        )


def _ids(keys: Mapping[str, bytes]) -> str:
    return ", ".join(repr(k) for k in sorted(keys)) or "no keys"


def _check_keys(name: str, keys: Any) -> dict[str, bytes]:
    if not isinstance(keys, Mapping):
        raise ConfigurationError(f"signing: {name}= must be a mapping of key id to bytes")
    out: dict[str, bytes] = {}
    for key_id, raw in keys.items():
        if not isinstance(key_id, str) or not key_id.strip() or "," in key_id or ":" in key_id:
            raise ConfigurationError(
                f"signing: key id {key_id!r} in {name}= must be a non-empty string "
                "without ',' or ':'")
        if not isinstance(raw, bytes | bytearray):
            raise ConfigurationError(
                f"signing: key {key_id!r} in {name}= must be raw bytes (decode base64 "
                "first, or use SigningConfig.from_env)")
        out[key_id.strip()] = bytes(raw)
    return out


def decode_base64(text: str) -> bytes:
    """Decode standard or URL-safe base64, padding optional; ValueError when invalid."""
    text = text.strip()
    if not text:
        raise ValueError("empty")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc


def _parse_key_list(var: str, value: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for position, item in enumerate(value.split(","), 1):
        item = item.strip()
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        key_id = key_id.strip()
        if not sep or not key_id:
            raise ConfigurationError(
                f"signing: entry {position} of {var} is not keyId:base64key")
        if key_id in out:
            raise ConfigurationError(f"signing: key id {key_id!r} appears twice in {var}")
        try:
            out[key_id] = decode_base64(encoded)
        except ValueError:
            # Never quote the value: it is key material.
            raise ConfigurationError(
                f"signing: the key of {key_id!r} in {var} is not valid base64") from None
    return out


def _ed25519() -> Any:
    require("crypto")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def _raw_public(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


# -- the canonical string ---------------------------------------------------------------


def canonical_bytes(envelope: Envelope) -> bytes:
    """The UTF-8 bytes that are signed for ``envelope`` (see the module docstring)."""
    headers = envelope.headers
    if SIGNATURE_HEADER in headers or SIGNATURE_KEY_HEADER in headers:
        headers = {k: v for k, v in headers.items()
                   if k != SIGNATURE_HEADER and k != SIGNATURE_KEY_HEADER}
    vt = envelope.visibility_timeout
    out: list[str] = ['{"args":']
    _json(envelope.args, out)
    out.append(f',"attempt":{int(envelope.attempt)},"enqueuedAt":"')
    out.append(canonical_time(envelope.enqueued_at))
    out.append('","headers":')
    _json(headers, out)
    out.append(',"id":')
    out.append(encode_basestring(envelope.id))
    out.append(f',"maxRetries":{int(envelope.max_retries)},"meta":')
    _json(envelope.meta, out)
    out.append(',"name":')
    out.append(encode_basestring(envelope.name))
    nb = envelope.not_before
    out.append(',"notBefore":' + ("null" if nb is None else f'"{canonical_time(nb)}"'))
    out.append(f',"priority":{int(envelope.priority)},"queue":')
    out.append(encode_basestring(envelope.queue))
    out.append(',"visibilityTimeoutMs":' + ("null" if vt is None else str(round(vt * 1000))))
    out.append("}")
    return "".join(out).encode("utf-8", "surrogatepass")


def canonical_time(dt: datetime) -> str:
    """``dt`` as the canonical string writes it: UTC, milliseconds, microseconds when not
    zero, ``Z``.

    A time read from the wire is written from its value (as a reader of the wire text
    sees it); one made here is written as it goes on the wire (milliseconds).
    """
    if isinstance(dt, WireTime) and dt.wire_text is not None:
        us = dt.microsecond
        rest = us % 1000
        return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
                f"{dt.second:02d}.{us // 1000:03d}" + (f"{rest:03d}Z" if rest else "Z"))
    return to_iso(dt)


def dart_double(value: float) -> str:
    """A float as Dart's ``double.toString`` writes it (what its ``jsonEncode`` uses).

    The shortest digits that read back as the same value (Python's ``repr`` finds the
    same ones), laid out in decimal for exponents -7 < e < 21 with at least one digit
    after the point, else as ``d.ddde+XX``. NaN and infinities go on the wire as null.
    """
    if not math.isfinite(value):
        return "null"
    if value == 0.0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    text = float.__repr__(abs(value))
    mantissa, _, exp_text = text.partition("e")
    exponent = int(exp_text) if exp_text else 0
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    # value = 0.DIGITS * 10**point
    point = (len(whole) if whole != "0" else -(len(frac) - len(frac.lstrip("0")))) + exponent
    digits = digits.rstrip("0") or "0"
    sign = "-" if value < 0 else ""
    sci = point - 1
    if -6 <= sci < 21:
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        if point >= len(digits):
            return f"{sign}{digits}{'0' * (point - len(digits))}.0"
        return f"{sign}{digits[:point]}.{digits[point:]}"
    head = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    return f"{sign}{head}e{'+' if sci >= 0 else '-'}{abs(sci)}"


def _sorted_keys(d: Mapping[str, Any]) -> list[str]:
    keys = list(d)
    if all(k.isascii() for k in keys):
        keys.sort()
    else:  # Dart compares strings by UTF-16 code units
        keys.sort(key=lambda k: k.encode("utf-16-be", "surrogatepass"))
    return keys


def _json(value: Any, out: list[str]) -> None:
    """Append ``value`` as key-sorted compact JSON (Dart's ``jsonEncode`` layout)."""
    if isinstance(value, str):
        out.append(encode_basestring(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(dart_double(value))
    elif isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            _json(_as_wire(value), out)
            return
        out.append("{")
        first = True
        for k in _sorted_keys(value):
            if not first:
                out.append(",")
            first = False
            out.append(encode_basestring(k))
            out.append(":")
            _json(value[k], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _json(item, out)
        out.append("]")
    else:  # whatever orjson writes for it (a datetime, a UUID, a pydantic model...)
        _json(_as_wire(value), out)


def _as_wire(value: Any) -> Any:
    from stem.encoding import json_default

    return orjson.loads(orjson.dumps(value, default=json_default))


# -- signing and verifying --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignatureProblem:
    """Why an envelope's signature was refused, and the key id it named (if any)."""

    error: str
    key_id: str | None = None

    @property
    def reason(self) -> str:
        """The dead-letter reason: ``signature-invalid: <error> (key 'id')``."""
        key = f" (key {self.key_id!r})" if self.key_id else ""
        return f"{SIGNATURE_INVALID}: {self.error}{key}"

    def status_meta(self) -> dict[str, Any]:
        """The FAILED status meta, as the Dart worker writes it."""
        meta: dict[str, Any] = {"security": SIGNATURE_INVALID, "error": self.error}
        if self.key_id:
            meta["keyId"] = self.key_id
        return meta

    def error_meta(self) -> dict[str, Any]:
        """The stored error's meta, as the Dart worker writes it."""
        meta: dict[str, Any] = {"reason": SIGNATURE_INVALID}
        if self.key_id:
            meta["keyId"] = self.key_id
        return meta


class PayloadSigner:
    """Signs and verifies envelopes with one :class:`SigningConfig`.

    ``invalid`` counts the envelopes :meth:`verify` refused (a metric will follow).
    """

    def __init__(self, config: SigningConfig) -> None:
        require("crypto")
        self.config = config
        self.algorithm = config.algorithm
        self.active_key = config.active_key if config.can_sign else None
        self.invalid = 0
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, hmac

        self._invalid_signature = InvalidSignature
        self._hmac = hmac.HMAC
        self._sha256 = hashes.SHA256()
        self._hmac_keys: dict[str, bytes] = {}
        self._public: dict[str, Any] = {}
        self._private: Any = None
        if self.algorithm == HMAC_SHA256:
            self._hmac_keys = dict(config.keys)
        else:
            ed = _ed25519()
            self._public = {k: ed.Ed25519PublicKey.from_public_bytes(v)
                            for k, v in config.public_keys.items()}
            if self.active_key is not None:
                self._private = ed.Ed25519PrivateKey.from_private_bytes(
                    config.private_keys[self.active_key])

    @property
    def can_sign(self) -> bool:
        """True when this signer holds the active key's secret."""
        return self.active_key is not None

    def __repr__(self) -> str:
        return f"<PayloadSigner {self.config!r}>"

    def signature(self, data: bytes) -> bytes:
        """The raw signature of ``data`` with the active key."""
        if self.active_key is None:
            raise ConfigurationError(
                f"signing: this process can only verify (no {ENV_ACTIVE_KEY} with its "
                f"private key in {ENV_PRIVATE_KEYS}); it cannot sign")
        if self._private is not None:
            signed: bytes = self._private.sign(data)
            return signed
        mac = self._hmac(self._hmac_keys[self.active_key], self._sha256)
        mac.update(data)
        sig: bytes = mac.finalize()
        return sig

    def sign(self, envelope: Envelope) -> None:
        """Set the two signature headers of ``envelope`` for its current fields."""
        try:
            data = canonical_bytes(envelope)
        except TypeError:
            envelope.to_json()  # raises the envelope's own error naming the bad argument
            raise
        sig = self.signature(data)
        assert self.active_key is not None
        envelope.headers[SIGNATURE_HEADER] = base64.b64encode(sig).decode("ascii")
        envelope.headers[SIGNATURE_KEY_HEADER] = self.active_key

    def sign_or_strip(self, envelope: Envelope) -> bool:
        """Re-sign a changed envelope (a retry); a verify-only process removes the stale
        signature instead (workers will refuse it as unsigned). True when signed."""
        if self.active_key is not None:
            self.sign(envelope)
            return True
        envelope.headers.pop(SIGNATURE_HEADER, None)
        envelope.headers.pop(SIGNATURE_KEY_HEADER, None)
        return False

    def verify(self, envelope: Envelope) -> SignatureProblem | None:
        """None when ``envelope`` carries a valid signature by a configured key."""
        problem = self._problem(envelope)
        if problem is not None:
            self.invalid += 1
        return problem

    def _problem(self, envelope: Envelope) -> SignatureProblem | None:
        headers = envelope.headers
        key_id = headers.get(SIGNATURE_KEY_HEADER) or None
        encoded = headers.get(SIGNATURE_HEADER)
        if not encoded or key_id is None:
            missing = SIGNATURE_HEADER if not encoded else SIGNATURE_KEY_HEADER
            return SignatureProblem(f"missing {missing} header", key_id)
        try:
            sig = decode_base64(encoded)
        except ValueError:
            return SignatureProblem("signature is not valid base64", key_id)
        invalid_signature = self._invalid_signature
        data = canonical_bytes(envelope)
        if self.algorithm == HMAC_SHA256:
            secret = self._hmac_keys.get(key_id)
            if secret is None:
                return SignatureProblem("unknown signing key", key_id)
            mac = self._hmac(secret, self._sha256)
            mac.update(data)
            try:
                mac.verify(sig)
            except invalid_signature:
                return SignatureProblem("signature mismatch", key_id)
            return None
        public = self._public.get(key_id)
        if public is None:
            return SignatureProblem("unknown signing key", key_id)
        try:
            public.verify(sig, data)
        except invalid_signature:
            return SignatureProblem("signature mismatch", key_id)
        return None


def signer_for(config: SigningConfig | None) -> PayloadSigner | None:
    """A signer for ``config``; None when signing is off."""
    return None if config is None else PayloadSigner(config)
