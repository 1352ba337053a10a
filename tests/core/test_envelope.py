"""Envelope wire format v1 and status codec."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stem
from stem import Envelope, EnvelopeDecodeError, TaskError, TaskState, TaskStatus

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=8,
)


def test_wire_keys_are_camel_case_with_iso_times_and_ms() -> None:
    env = Envelope(
        name="email.send",
        args={"to": "a@b"},
        id="abc",
        enqueued_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        not_before=datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC),
        priority=7,
        attempt=2,
        max_retries=3,
        visibility_timeout=1.5,
        queue="emails",
        headers={"h": "v"},
        meta={"m": 1},
    )
    assert orjson.loads(env.to_json()) == {
        "id": "abc",
        "name": "email.send",
        "args": {"to": "a@b"},
        "headers": {"h": "v"},
        "enqueuedAt": "2025-01-02T03:04:05.678Z",
        "notBefore": "2025-01-02T03:04:06.000Z",
        "priority": 7,
        "attempt": 2,
        "maxRetries": 3,
        "visibilityTimeout": 1500,
        "queue": "emails",
        "meta": {"m": 1},
    }


def test_unknown_keys_survive_a_round_trip() -> None:
    raw = orjson.dumps({"id": "x", "name": "t", "args": {}, "futureField": {"a": [1]}})
    env = Envelope.from_json(raw)
    assert env.extra == {"futureField": {"a": [1]}}
    assert orjson.loads(env.to_json())["futureField"] == {"a": [1]}


def test_dart_style_local_time_without_offset_is_read_as_local_time() -> None:
    env = Envelope.from_json(b'{"id":"x","name":"t","args":{},"enqueuedAt":"2025-01-02T03:04:05.123456"}')
    # As Dart's DateTime.parse does; stored aware and in UTC, written back as read.
    assert env.enqueued_at == datetime(2025, 1, 2, 3, 4, 5, 123456).astimezone(UTC)
    assert env.enqueued_at.tzinfo is UTC
    assert orjson.loads(env.to_json())["enqueuedAt"] == "2025-01-02T03:04:05.123456"


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1,2]", b'{"args":{}}', b'{"name":"","args":{}}', b'{"name":"t","args":[1]}',
     b'{"name":"t","args":{},"priority":"high"}', b'{"name":"t","args":{},"enqueuedAt":"yesterday"}'],
)
def test_malformed_envelopes_raise_a_decode_error(raw: bytes) -> None:
    with pytest.raises(EnvelopeDecodeError):
        Envelope.from_json(raw)


@given(args=st.dictionaries(st.text(), json_values, max_size=5), attempt=st.integers(0, 100),
       priority=st.integers(0, 9))
def test_round_trip_property(args: dict[str, object], attempt: int, priority: int) -> None:
    env = Envelope(name="t", args=args, attempt=attempt, priority=priority)
    back = Envelope.from_json(env.to_json())
    assert back.to_json() == env.to_json()


def test_status_round_trip_keeps_unknown_keys() -> None:
    st_ = TaskStatus("id1", TaskState.FAILED, payload=None,
                     error=TaskError("ValueError", "boom", "tb", True, extra={"code": 3}),
                     meta={"a": 1}, attempt=2, extra={"dartOnly": True})
    data = orjson.loads(st_.to_json())
    assert data["error"] == {"type": "ValueError", "message": "boom", "stack": "tb",
                             "retryable": True, "meta": {}, "code": 3}
    assert TaskStatus.from_json(st_.to_json()) == st_
    assert TaskState.SUCCEEDED.is_terminal and not TaskState.RETRIED.is_terminal


def test_task_ids_are_unique_time_ordered_uuid7() -> None:
    import uuid

    from stem.envelope import new_task_id

    ids = [new_task_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed) == ids[0]
    assert ids[0][:13] <= ids[-1][:13]  # the millisecond prefix never goes backwards


# -- hardening: every field checked at decode -----------------------------------------

def _raw(**fields: object) -> bytes:
    return orjson.dumps({"id": "x1", "name": "t", "args": {}, **fields})


def test_an_envelope_without_an_id_is_refused_not_given_a_fresh_one() -> None:
    from stem.envelope import decode_envelope

    for raw in (b'{"name":"t","args":{}}', _raw(id=None), _raw(id="")):
        assert decode_envelope(raw) == (None, "envelope has no id")
    env, reason = decode_envelope(_raw(id=7))
    assert env is None and reason is not None and "'id' must be a string" in reason
    # Built in Python code, an envelope still gets a fresh id by default.
    assert Envelope(name="t").id != Envelope(name="t").id


@pytest.mark.parametrize(("field", "value", "says"), [
    ("attempt", -1, "outside 0..1000000"),
    ("attempt", 1_000_001, "outside 0..1000000"),
    ("attempt", "3", "must be a whole number"),
    ("attempt", True, "must be a whole number"),
    ("attempt", 1.5, "must be a whole number"),
    ("maxRetries", "x", "must be a whole number"),
    ("maxRetries", 2**62, "outside 0..1000000"),
    ("visibilityTimeout", 0, "visibility timeout 0.0 s is outside"),
    ("visibilityTimeout", -5000, "is outside"),
    ("visibilityTimeout", 1e16, "is outside"),
    ("visibilityTimeout", "30000", "must be milliseconds"),
    ("priority", "high", "must be a number"),
    ("queue", ["q"], "'queue' must be a string"),
    ("enqueuedAt", ["x"], "invalid envelope"),
    ("notBefore", "0001-01-01T00:00:00+14:00", "invalid envelope"),
])
def test_out_of_range_or_mistyped_numbers_are_refused_with_a_reason(
        field: str, value: object, says: str) -> None:
    from stem.envelope import decode_envelope

    env, reason = decode_envelope(_raw(**{field: value}))
    assert env is None and reason is not None and says in reason, reason


def test_in_range_numbers_decode_and_priority_is_clamped() -> None:
    env = Envelope.from_json(_raw(attempt=1100, maxRetries=2000, visibilityTimeout=100,
                                  priority=42, queue=None))
    assert (env.attempt, env.max_retries, env.visibility_timeout, env.queue) == (
        1100, 2000, 0.1, "default")
    assert env.priority == 9
    assert Envelope.from_json(_raw(priority=-3)).priority == 0
    assert Envelope.from_json(_raw(priority=5.7)).priority == 5
    assert Envelope.from_json(_raw(attempt=2.0)).attempt == 2  # a whole float is a number


hostile_values = st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats() \
    | st.text(max_size=30) | st.lists(st.integers(), max_size=2) \
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


@settings(deadline=None)  # a loaded CI machine must not turn slowness into a failure
@given(fields=st.dictionaries(
    st.sampled_from(["id", "name", "args", "headers", "enqueuedAt", "notBefore", "priority",
                     "attempt", "maxRetries", "visibilityTimeout", "queue", "meta", "x"]),
    hostile_values, max_size=12))
def test_decode_either_returns_an_envelope_or_a_reason_never_raises(fields: dict[str, object]
                                                                    ) -> None:
    from stem.envelope import decode_envelope

    try:
        raw = orjson.dumps(fields)
    except TypeError:  # NaN/inf and 2**64 are not JSON
        return
    env, reason = decode_envelope(raw)
    assert (env is None) != (reason is None)
    if env is not None:  # a decoded envelope always re-encodes and decodes the same
        assert 0 <= env.priority <= 9 and env.id
        assert Envelope.from_json(env.to_json()).to_json() == env.to_json()


@pytest.fixture
def small_payload_cap(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    from stem.envelope import reset_payload_limit

    monkeypatch.setenv("STEM_MAX_PAYLOAD_BYTES", "2000")
    reset_payload_limit()
    yield 2000
    reset_payload_limit()


def test_oversized_bytes_are_refused_without_being_parsed(small_payload_cap: int) -> None:
    from stem.envelope import decode_envelope, peek_task_id
    from stem.errors import PayloadTooLargeError

    # Not even JSON: the size alone decides, the parser never sees it.
    big = b'{"id":"x1","name":"t","args":{"pad":"' + b"a" * 3000
    assert decode_envelope(big) == (
        None, f"envelope is {len(big)} bytes, over the 2000-byte payload limit "
              "(STEM_MAX_PAYLOAD_BYTES)")
    assert peek_task_id(big) is None
    with pytest.raises(PayloadTooLargeError, match="2000-byte"):
        Envelope(name="t", args={"pad": "a" * 3000}).to_json()
    assert Envelope.from_json(Envelope(name="t", args={"pad": "a" * 1500}).to_json())


def test_a_bad_payload_cap_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from stem.envelope import payload_limit, reset_payload_limit

    monkeypatch.setenv("STEM_MAX_PAYLOAD_BYTES", "lots")
    reset_payload_limit()
    try:
        with pytest.raises(stem.ConfigurationError, match="STEM_MAX_PAYLOAD_BYTES"):
            payload_limit()
    finally:
        reset_payload_limit()
