"""Built-in payload encoders and the registry, without any broker."""

from __future__ import annotations

import base64
import gzip
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stem
from stem import ConfigurationError, PayloadEncodingError
from stem.encoding import (
    AesGcmPayloadEncoder,
    GzipJsonPayloadEncoder,
    JsonPayloadEncoder,
    TaskPayloadEncoder,
    TaskPayloadEncoderRegistry,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                       max_size=4),
    max_leaves=12,
)
K1, K2 = bytes(range(32)), bytes(range(100, 132))


def aes(**kw: Any) -> AesGcmPayloadEncoder:
    return AesGcmPayloadEncoder({"k1": K1, "k2": K2}, primary=kw.pop("primary", "k2"), **kw)


@given(json_values)
def test_gzip_round_trip(value: Any) -> None:
    enc = GzipJsonPayloadEncoder()
    payload = enc.encode(value)
    assert set(payload) == {"gzip"}
    assert orjson.loads(orjson.dumps(payload)) == payload  # JSON-safe
    assert enc.decode(payload) == value


@given(json_values)
def test_aes_round_trip(value: Any) -> None:
    enc = aes()
    payload = enc.encode(value)
    assert set(payload) == {"keyId", "nonce", "ciphertext", "mac"} and payload["keyId"] == "k2"
    assert enc.decode(payload) == value


def test_gzip_payload_is_plain_gzip_of_json_and_deterministic() -> None:
    enc = GzipJsonPayloadEncoder()
    value = {"rows": [{"sku": "A-1", "qty": 1}] * 200}
    payload = enc.encode(value)
    assert orjson.loads(gzip.decompress(base64.b64decode(payload["gzip"]))) == value
    assert enc.encode(value) == payload  # mtime=0: equal values, equal bytes
    assert len(payload["gzip"]) < len(orjson.dumps(value)) / 10


def test_gzip_rejects_garbage_and_bombs() -> None:
    enc = GzipJsonPayloadEncoder(max_size=1000)
    for bad, match in [
        ("nope", "expects a JSON object"),
        ({"data": "x"}, "expects a JSON object"),
        ({"gzip": 5}, "base64 string"),
        ({"gzip": "***"}, "not valid base64"),
        ({"gzip": base64.b64encode(b"plain text").decode()}, "not gzip"),
        ({"gzip": base64.b64encode(gzip.compress(b"{"))
          .decode()}, "not JSON"),
        ({"gzip": base64.b64encode(gzip.compress(b"[" + b"0," * 5000 + b"0]"))
          .decode()}, "beyond max_size"),
        ({"gzip": base64.b64encode(gzip.compress(b"[1,2,3]")[:-12]).decode()}, "truncated"),
    ]:
        with pytest.raises(PayloadEncodingError, match=match):
            enc.decode(bad)


def test_every_encryption_uses_a_fresh_nonce() -> None:
    enc = aes()
    a, b = enc.encode({"msg": "attack at dawn"}), enc.encode({"msg": "attack at dawn"})
    assert a["nonce"] != b["nonce"] and a["ciphertext"] != b["ciphertext"]
    assert b"attack at dawn" not in base64.b64decode(a["ciphertext"])


def test_key_rotation_old_payloads_still_decrypt() -> None:
    old = AesGcmPayloadEncoder({"k1": K1})
    before = old.encode({"secret": 1})
    rotated = aes(primary="k2")
    assert rotated.decode(before) == {"secret": 1}
    assert rotated.encode({"secret": 2})["keyId"] == "k2"
    with pytest.raises(PayloadEncodingError, match=r"key 'k2', which this process does not have"):
        old.decode(rotated.encode({"secret": 2}))


def test_wrong_key_and_tampering_fail_authentication() -> None:
    enc = aes()
    payload = enc.encode({"amount": 100})
    impostor = AesGcmPayloadEncoder({"k2": bytes(32)})
    with pytest.raises(PayloadEncodingError, match="failed authentication with key 'k2'"):
        impostor.decode(payload)

    def flip(field: str) -> dict[str, str]:
        raw = bytearray(base64.b64decode(payload[field]))
        raw[0] ^= 1
        return {**payload, field: base64.b64encode(bytes(raw)).decode()}

    for field in ("ciphertext", "mac", "nonce"):
        with pytest.raises(PayloadEncodingError, match="failed authentication"):
            enc.decode(flip(field))
    with pytest.raises(PayloadEncodingError, match="failed authentication"):
        enc.decode({**payload, "keyId": "k1"})  # same ciphertext, other key
    with pytest.raises(PayloadEncodingError, match="expects a JSON object"):
        enc.decode({"amount": 100})
    with pytest.raises(PayloadEncodingError, match="'mac' is not valid base64"):
        enc.decode({**payload, "mac": "%%%"})
    with pytest.raises(PayloadEncodingError, match="nonce must be 12 bytes"):
        enc.decode({**payload, "nonce": base64.b64encode(b"short").decode()})
    with pytest.raises(PayloadEncodingError, match="does not have"):
        enc.decode({**payload, "keyId": None})


def test_aes_configuration_errors_and_no_key_in_repr() -> None:
    with pytest.raises(ConfigurationError, match="at least one key"):
        AesGcmPayloadEncoder({})
    with pytest.raises(ConfigurationError, match="primary"):
        AesGcmPayloadEncoder({"a": K1, "b": K2})
    with pytest.raises(ConfigurationError, match="not among the keys"):
        AesGcmPayloadEncoder({"a": K1}, primary="b")
    with pytest.raises(ConfigurationError, match="16, 24 or 32 bytes"):
        AesGcmPayloadEncoder({"a": b"short"})
    with pytest.raises(ConfigurationError, match="16, 24 or 32 bytes"):
        AesGcmPayloadEncoder({"a": K1.hex()})  # type: ignore[dict-item]
    enc = aes()
    assert K1.hex() not in repr(enc) and "k1" in repr(enc)
    assert len(AesGcmPayloadEncoder.generate_key()) == 32
    aes128 = AesGcmPayloadEncoder({"small": AesGcmPayloadEncoder.generate_key(128)})
    assert aes128.decode(aes128.encode([1])) == [1]


def test_not_json_serialisable_values_are_encoding_errors() -> None:
    for enc in (GzipJsonPayloadEncoder(), aes()):
        with pytest.raises(PayloadEncodingError, match="not JSON-serialisable"):
            enc.encode({"when": object()})


def test_builtin_encoders_satisfy_the_protocol() -> None:
    for enc in (JsonPayloadEncoder(), GzipJsonPayloadEncoder(), aes()):
        assert isinstance(enc, TaskPayloadEncoder)
    assert stem.AesGcmPayloadEncoder is AesGcmPayloadEncoder
    assert stem.GzipJsonPayloadEncoder is GzipJsonPayloadEncoder


# -- registry ---------------------------------------------------------------------------


class Reverse:
    """An args encoder that breaks the 'args is a map' rule."""

    id = "reverse"

    def encode(self, value: Any) -> Any:
        return list(value.items())

    def decode(self, data: Any) -> Any:
        return list(data.items())


def test_registry_defaults_and_lookup() -> None:
    reg = TaskPayloadEncoderRegistry()
    assert reg.default_args_encoder.id == reg.default_result_encoder.id == "json"
    assert reg.ids == ["json"]
    reg = TaskPayloadEncoderRegistry(args_encoder=GzipJsonPayloadEncoder(),
                                     result_encoder=aes(), encoders=[Reverse()])
    assert reg.ids == ["aes-gcm", "gzip-json", "json", "reverse"]
    with pytest.raises(PayloadEncodingError, match=r"unknown payload encoder 'nope'.*known"):
        reg.get("nope")
    with pytest.raises(ConfigurationError, match="non-empty string 'id'"):
        reg.register(GzipJsonPayloadEncoder(id=""))


def test_args_are_always_a_json_object() -> None:
    reg = TaskPayloadEncoderRegistry()
    with pytest.raises(PayloadEncodingError, match="must encode task args to a JSON object"):
        reg.encode_args({"a": 1}, Reverse())
    reg.register(Reverse())
    with pytest.raises(PayloadEncodingError, match="must decode task args to a JSON object"):
        reg.decode_args({"a": 1}, "reverse")
    # A null args payload means no arguments (as the Dart worker reads it).
    reg.register(type("Nothing", (), {"id": "nothing", "encode": lambda s, v: v,
                                      "decode": lambda s, d: None})())
    assert reg.decode_args({"x": 1}, "nothing") == {}


def test_args_decoding_picks_the_encoder_like_the_dart_worker() -> None:
    gz = GzipJsonPayloadEncoder()
    reg = TaskPayloadEncoderRegistry()
    wire = reg.encode_args({"a": 1}, gz)
    # The envelope names it: the task's own encoder resolves even if not registered.
    assert reg.decode_args(wire, "gzip-json", preferred=gz) == {"a": 1}
    # No id on the wire: the task's own encoder, else the registry default.
    assert reg.decode_args(wire, None, preferred=gz) == {"a": 1}
    assert reg.decode_args({"a": 1}, None) == {"a": 1}
    # An id nobody registered is an error (Dart would silently use its default).
    with pytest.raises(PayloadEncodingError, match="unknown payload encoder 'gzip-json'"):
        reg.decode_args(wire, "gzip-json")


def test_results_carry_the_encoder_id() -> None:
    reg = TaskPayloadEncoderRegistry(result_encoder=aes())
    payload, encoder_id = reg.encode_result([1, 2])
    assert encoder_id == "aes-gcm" and reg.decode_result(payload, encoder_id) == [1, 2]
    assert reg.decode_result(payload, None) == [1, 2]  # no id: the default result encoder
    assert reg.encode_result("x", JsonPayloadEncoder()) == ("x", "json")
    with pytest.raises(PayloadEncodingError, match="not JSON-serialisable"):
        reg.encode_result(object())


def test_a_failing_custom_encoder_becomes_a_payload_encoding_error() -> None:
    class Broken:
        id = "broken"

        def encode(self, value: Any) -> Any:
            raise RuntimeError("disk on fire")

        def decode(self, data: Any) -> Any:
            raise KeyError("missing")

    reg = TaskPayloadEncoderRegistry(encoders=[Broken()])
    with pytest.raises(PayloadEncodingError, match="could not encode the task args: disk"):
        reg.encode_args({}, Broken())
    with pytest.raises(PayloadEncodingError, match="could not decode the task args"):
        reg.decode_args({}, "broken")
    with pytest.raises(PayloadEncodingError, match="could not encode the task result"):
        reg.encode_result(1, Broken())
    with pytest.raises(PayloadEncodingError, match="could not decode the task result"):
        reg.decode_result(1, "broken")
