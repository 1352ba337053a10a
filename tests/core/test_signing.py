"""Payload signing: the canonical string (golden, built by hand from the documented rules),
configuration checks, and the worker refusing what does not verify (memory)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import stem
from stem import ConfigurationError, SigningConfig, TaskState
from stem.config import StemConfig
from stem.envelope import Envelope
from stem.signing import (
    SIGNATURE_HEADER,
    SIGNATURE_KEY_HEADER,
    PayloadSigner,
    canonical_bytes,
    dart_double,
)
from tests.helpers import eventually, running_worker

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"
SECRET = bytes(range(32))
SECRET_B64 = base64.b64encode(SECRET).decode()


def _hmac_b64(secret: bytes, text: str) -> str:
    # Independent of stem.signing: the standard library over the hand-built string.
    return base64.b64encode(hmac.new(secret, text.encode(), hashlib.sha256).digest()).decode()


def _seed(n: int) -> bytes:
    return bytes([n]) * 32


def _public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hmac_config(active: str = "k1", **keys: bytes) -> SigningConfig:
    return SigningConfig(keys=keys or {"k1": SECRET}, active_key=active)


# -- the canonical string, golden ------------------------------------------------------

#: The Dart fixture (envelope_dart_utc_micros.json) as the documented rules write it:
#: fields sorted, nested maps sorted, no signature headers, times as UTC with the
#: microseconds, numbers as Dart prints them (430.0 stays 430.0), non-ASCII as is.
DART_MICROS_CANONICAL = (
    '{"args":{"amount":1250.75,"nested":{"deep":{"n":-1}},"rounded":430.0,'
    '"subject":"hi","tags":["x",null,true],"to":"a@example.com"},'
    '"attempt":0,"enqueuedAt":"2026-03-21T10:15:30.123456Z",'
    '"headers":{"stem-args-encoder":"json",'
    '"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},'
    '"id":"019610a2-5b7e-7c3d-9e21-4b5f6a7b8c9d","maxRetries":3,'
    '"meta":{"__stemArgsEncoder":"json","stem.retryPolicy":{"autoRetryFor":["TimeoutException"],'
    '"backoff":true,"backoffMaxMs":60000,"defaultDelayMs":500,"dontAutoRetryFor":[],'
    '"jitter":false,"maxRetries":3},"stem.task":"email.send"},'
    '"name":"email.send","notBefore":null,"priority":5,"queue":"emails",'
    '"visibilityTimeoutMs":null}'
)

#: An envelope with non-ASCII text and keys, control characters, Dart-style numbers,
#: a time with an offset, a 6-digit time whose microseconds are zero, and a lease.
UNUSUAL_WIRE = (
    '{"id":"t-1","name":"caf\u00e9.r\u00e9sum\u00e9","args":{"z":1e21,"big":1e20,'
    '"tiny":1e-7,"small":0.000001,"neg":-0.5,"note":"cr\u00e8me \u2014 \u6771\u4eac\\n\\t\\u0001\\"/",'
    '"\u00fcber":1,"ab":[{"b":2,"a":1.0}]},'
    '"headers":{"x-trace":"abc","stem-signature":"c2ln","stem-signature-key":"k1"},'
    '"enqueuedAt":"2025-03-04T07:06:07.123456+02:00","notBefore":"2025-03-04T05:06:08.120000Z",'
    '"priority":3,"attempt":2,"maxRetries":4,"visibilityTimeout":30000,"queue":"billing",'
    '"meta":{"z":true,"a":null,"\u00df":"\u00e9"}}'
)
UNUSUAL_CANONICAL = (
    '{"args":{"ab":[{"a":1.0,"b":2}],"big":100000000000000000000.0,"neg":-0.5,'
    '"note":"cr\u00e8me \u2014 \u6771\u4eac\\n\\t\\u0001\\"/","small":0.000001,"tiny":1e-7,'
    '"z":1e+21,"\u00fcber":1},'
    '"attempt":2,"enqueuedAt":"2025-03-04T05:06:07.123456Z","headers":{"x-trace":"abc"},'
    '"id":"t-1","maxRetries":4,"meta":{"a":null,"z":true,"\u00df":"\u00e9"},'
    '"name":"caf\u00e9.r\u00e9sum\u00e9","notBefore":"2025-03-04T05:06:08.120Z","priority":3,'
    '"queue":"billing","visibilityTimeoutMs":30000}'
)


def test_canonical_string_of_a_dart_envelope_is_built_as_documented() -> None:
    env = Envelope.from_json((WIRE / "envelope_dart_utc_micros.json").read_bytes())
    assert canonical_bytes(env) == DART_MICROS_CANONICAL.encode()


def test_canonical_string_with_non_ascii_offsets_and_dart_numbers() -> None:
    env = Envelope.from_json(UNUSUAL_WIRE.encode())
    assert canonical_bytes(env).decode() == UNUSUAL_CANONICAL


def test_hmac_signature_matches_an_independent_computation() -> None:
    env = Envelope.from_json(UNUSUAL_WIRE.encode())
    signer = PayloadSigner(_hmac_config())
    signer.sign(env)
    assert env.headers[SIGNATURE_HEADER] == _hmac_b64(SECRET, UNUSUAL_CANONICAL)
    assert env.headers[SIGNATURE_KEY_HEADER] == "k1"


def test_an_envelope_signed_elsewhere_verifies_and_a_changed_one_does_not() -> None:
    # As a Dart producer would send it: the signature over the documented string.
    data = json.loads((WIRE / "envelope_dart_utc_micros.json").read_text())
    data["headers"]["stem-signature"] = _hmac_b64(SECRET, DART_MICROS_CANONICAL)
    data["headers"]["stem-signature-key"] = "k1"
    raw = json.dumps(data, ensure_ascii=False).encode()
    signer = PayloadSigner(_hmac_config())
    assert signer.verify(Envelope.from_json(raw)) is None
    tampered = Envelope.from_json(raw.replace(b'"amount": 1250.75', b'"amount": 1250.76'))
    problem = signer.verify(tampered)
    assert problem is not None and problem.error == "signature mismatch"
    assert problem.key_id == "k1" and signer.invalid == 1


def test_ed25519_signature_over_the_canonical_string() -> None:
    seed = _seed(7)
    config = SigningConfig(algorithm="ed25519", public_keys={"e1": _public(seed)},
                           private_keys={"e1": seed}, active_key="e1")
    env = Envelope.from_json(UNUSUAL_WIRE.encode())
    PayloadSigner(config).sign(env)
    sig = base64.b64decode(env.headers[SIGNATURE_HEADER])
    # Checked with the public key alone, over the hand-built string.
    Ed25519PrivateKey.from_private_bytes(seed).public_key().verify(
        sig, UNUSUAL_CANONICAL.encode())
    verify_only = PayloadSigner(SigningConfig(algorithm="ed25519",
                                              public_keys={"e1": _public(seed)}))
    assert not verify_only.can_sign
    assert verify_only.verify(env) is None


@pytest.mark.parametrize(("value", "text"), [
    (1.0, "1.0"), (430.0, "430.0"), (0.1, "0.1"), (-0.0, "-0.0"), (1e20, "100000000000000000000.0"),
    (1e21, "1e+21"), (1.5e-7, "1.5e-7"), (1e-6, "0.000001"), (123456.789e3, "123456789.0"),
    (2.5e-10, "2.5e-10"), (1.7976931348623157e308, "1.7976931348623157e+308"),
])
def test_numbers_are_written_as_dart_prints_them(value: float, text: str) -> None:
    assert dart_double(value) == text


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(args=st.dictionaries(st.text(max_size=6), _json_values, max_size=5),
       micros=st.integers(0, 999_999))
def test_producer_and_worker_build_the_same_string(args: dict[str, Any], micros: int) -> None:
    """What a producer signs is what a worker reading the wire bytes rebuilds."""
    env = Envelope(name="t", args=args, meta={"m": args},
                   enqueued_at=datetime(2026, 1, 2, 3, 4, 5, micros, tzinfo=UTC))
    signer = PayloadSigner(_hmac_config())
    signer.sign(env)
    wire = Envelope.from_json(env.to_json())
    assert canonical_bytes(wire) == canonical_bytes(env)
    assert signer.verify(wire) is None


def test_arguments_orjson_writes_for_us_are_signed_as_they_travel() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    env = Envelope(name="t", args={"when": when, "pair": (1, 2)})
    signer = PayloadSigner(_hmac_config())
    signer.sign(env)
    assert signer.verify(Envelope.from_json(env.to_json())) is None


# -- configuration ---------------------------------------------------------------------


def _env(**values: str) -> dict[str, str]:
    return {f"STEM_SIGNING_{k.upper()}": v for k, v in values.items()}


def test_no_keys_means_no_signing() -> None:
    assert SigningConfig.from_env({}) is None
    assert StemConfig.from_env({}).signing is None


def test_env_keys_parse_and_repr_shows_no_key_material() -> None:
    config = SigningConfig.from_env(_env(keys=f" k1:{SECRET_B64} , k2:{SECRET_B64[:-1]}",
                                         active_key="k2"))
    assert config is not None and config.keys["k1"] == SECRET and config.active_key == "k2"
    assert config.keys["k2"] == SECRET  # padding is optional
    text = repr(StemConfig.from_env(_env(keys=f"k1:{SECRET_B64}", active_key="k1")))
    assert "k1" in text and SECRET_B64 not in text and "SECRET" not in text


@pytest.mark.parametrize(("env", "words"), [
    (_env(keys=f"k1:{SECRET_B64}"), ["missing STEM_SIGNING_ACTIVE_KEY", "'k1'"]),
    (_env(keys=f"k1:{SECRET_B64}", active_key="k9"), ["'k9'", "not in STEM_SIGNING_KEYS"]),
    (_env(keys="k1:not*base64!", active_key="k1"), ["'k1'", "not valid base64"]),
    (_env(keys=f"{SECRET_B64}", active_key="k1"), ["not keyId:base64key"]),
    (_env(keys=f"k1:{SECRET_B64},k1:{SECRET_B64}", active_key="k1"), ["twice"]),
    (_env(algorithm="rsa", keys=f"k1:{SECRET_B64}", active_key="k1"), ["unknown algorithm"]),
    (_env(algorithm="ed25519", public_keys="e1:" + base64.b64encode(b"x" * 31).decode()),
     ["'e1'", "31 bytes", "32"]),
    (_env(algorithm="ed25519", public_keys="e1:" + base64.b64encode(_public(_seed(1))).decode(),
          private_keys="e1:" + base64.b64encode(_seed(2)).decode(), active_key="e1"),
     ["do not belong together"]),
    (_env(algorithm="ed25519", public_keys="e1:" + base64.b64encode(_public(_seed(1))).decode(),
          private_keys="e1:" + base64.b64encode(_seed(1)).decode()),
     ["STEM_SIGNING_ACTIVE_KEY"]),
    (_env(public_keys="e1:" + base64.b64encode(_public(_seed(1))).decode()),
     ["STEM_SIGNING_ALGORITHM=ed25519"]),
])
def test_misconfiguration_fails_at_startup_saying_what_to_fix(env: dict[str, str],
                                                              words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        StemConfig.from_env(env)
    message = str(info.value)
    for word in words:
        assert word in message
    assert SECRET_B64 not in message and "not*base64!" not in message
    with pytest.raises(ConfigurationError):  # an app from the environment too
        _app_from(env)


def _app_from(env: dict[str, str]) -> stem.Stem:
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        return stem.Stem.from_env("t", broker="memory://x")


def test_a_verify_only_app_cannot_enqueue() -> None:
    app = stem.Stem("t", broker="memory://vo", signing=SigningConfig(
        algorithm="ed25519", public_keys={"e1": _public(_seed(1))}))
    with pytest.raises(ConfigurationError, match="only verify"):
        app.build_envelope(app.definition("x").call())


# -- the worker ------------------------------------------------------------------------


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return stem.Stem("t", broker=f"memory://{namespace}", backend=f"memory://{namespace}",
                     signing=_hmac_config())


async def test_signed_tasks_run_and_bad_signatures_are_dead_lettered(app: stem.Stem) -> None:
    calls: list[int] = []

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        calls.append(a)
        return a + b

    unsigned = Envelope(name="add", args={"a": 1, "b": 1})
    tampered = app.build_envelope(add.call(2, 2))
    tampered.args["a"] = 200
    unknown_key = app.build_envelope(add.call(3, 3))
    unknown_key.headers[SIGNATURE_KEY_HEADER] = "k9"
    garbled = app.build_envelope(add.call(4, 4))
    garbled.headers[SIGNATURE_HEADER] = "***"
    async with running_worker(app) as worker:
        await app.broker.publish([unsigned, tampered, unknown_key, garbled])
        results = [await app.wait(e.id, timeout=5)
                   for e in (unsigned, tampered, unknown_key, garbled)]
        ok = await app.wait(await app.enqueue("add", 5, 6), timeout=5)  # still serving
        dead = await eventually(lambda: _at_least(app.broker.dead_letters("default"), 4))
    assert ok.value == 11 and calls == [5]
    assert worker.app.signer is not None and worker.app.signer.invalid == 4
    for r in results:
        assert r.state is TaskState.FAILED and r.error is not None
        assert r.error.type == "SignatureInvalid"
        assert r.meta["security"] == "signature-invalid"
    errors = [(r.meta["error"], r.meta.get("keyId")) for r in results]
    assert errors == [("missing stem-signature header", None), ("signature mismatch", "k1"),
                      ("unknown signing key", "k9"), ("signature is not valid base64", "k1")]
    assert results[1].error is not None and results[1].error.meta == {
        "reason": "signature-invalid", "keyId": "k1"}
    # Read back as Dart shows dead letters: the code as reason, the error in meta.
    assert {d.reason for d in dead} == {"signature-invalid"}
    assert "signature mismatch (key 'k1')" in {d.meta["error"] for d in dead}


async def test_retries_are_re_signed(app: stem.Stem) -> None:
    attempts: list[int] = []

    @app.task(name="flaky", max_retries=2)
    def flaky(ctx: stem.TaskContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise stem.Retry(countdown=0.01)
        return "done"

    async with running_worker(app):
        result = await app.wait(await app.enqueue("flaky"), timeout=10)
    assert result.value == "done" and attempts == [0, 1, 2]
    assert app.signer is not None and app.signer.invalid == 0


async def test_a_verify_only_ed25519_worker_runs_what_producers_sign(namespace: str) -> None:
    seed = _seed(3)
    url = f"memory://{namespace}"
    producer = stem.Stem("t", broker=url, backend=url, signing=SigningConfig(
        algorithm="ed25519", public_keys={"e1": _public(seed)}, private_keys={"e1": seed},
        active_key="e1"))
    worker_app = stem.Stem("t", broker=url, backend=url, signing=SigningConfig(
        algorithm="ed25519", public_keys={"e1": _public(seed)}))

    @worker_app.task(name="echo")
    def echo(text: str) -> str:
        return text

    async with running_worker(worker_app):
        tid = await producer.enqueue("echo", text="h\u00e9llo \u6771\u4eac")
        result = await producer.wait(tid, timeout=5)
    assert result.value == "h\u00e9llo \u6771\u4eac"
    assert worker_app.signer is not None and worker_app.signer.invalid == 0


async def _at_least(coro: object, n: int) -> object:
    items = await coro  # type: ignore[misc]
    return items if len(items) >= n else None
