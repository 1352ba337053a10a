"""Envelope wire format v1 and status codec."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
