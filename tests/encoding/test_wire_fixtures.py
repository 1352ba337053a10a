"""Golden envelopes and statuses as the Dart Stem writes them (tests/fixtures/wire/)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

import stem
from stem import Envelope, TaskState, TaskStatus
from stem.encoding import (
    ARGS_ENCODER_HEADER,
    AesGcmPayloadEncoder,
    GzipJsonPayloadEncoder,
    TaskPayloadEncoderRegistry,
)

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"
ENVELOPES = sorted(WIRE.glob("*envelope*.json"))
STATUSES = sorted(WIRE.glob("*status*.json"))
DART_KEYS = ["id", "name", "args", "headers", "enqueuedAt", "notBefore", "priority", "attempt",
             "maxRetries", "visibilityTimeout", "queue", "meta"]


def raw(name: str) -> bytes:
    return (WIRE / name).read_bytes()


def test_fixture_sets_are_not_empty() -> None:
    assert len(ENVELOPES) >= 5 and len(STATUSES) >= 5


@pytest.mark.parametrize("path", ENVELOPES, ids=lambda p: p.name)
def test_envelope_round_trips_to_the_same_json(path: Path) -> None:
    data = path.read_bytes()
    env = Envelope.from_json(data)
    assert orjson.loads(env.to_json()) == orjson.loads(data)
    # Through a copy too (what the worker does when it re-publishes a retry).
    assert orjson.loads(env.copy().to_json()) == orjson.loads(data)


@pytest.mark.parametrize("path", STATUSES, ids=lambda p: p.name)
def test_status_round_trips_to_the_same_json(path: Path) -> None:
    data = path.read_bytes()
    assert orjson.loads(TaskStatus.from_json(data).to_json()) == orjson.loads(data)


def test_dart_utc_envelope_decodes_field_by_field() -> None:
    env = Envelope.from_json(raw("envelope_dart_utc_micros.json"))
    assert env.id == "019610a2-5b7e-7c3d-9e21-4b5f6a7b8c9d"
    assert env.name == "email.send" and env.queue == "emails"
    assert env.enqueued_at == datetime(2026, 3, 21, 10, 15, 30, 123456, tzinfo=UTC)
    assert env.not_before is None and env.visibility_timeout is None
    assert (env.priority, env.attempt, env.max_retries) == (5, 0, 3)
    assert env.args["amount"] == 1250.75 and env.args["tags"] == ["x", None, True]
    assert env.headers[ARGS_ENCODER_HEADER] == "json"
    assert env.meta["stem.retryPolicy"]["backoffMaxMs"] == 60000
    assert env.extra == {}


def test_dart_retry_envelope_keeps_both_time_precisions() -> None:
    env = Envelope.from_json(raw("envelope_dart_retry.json"))
    assert env.visibility_timeout == 30.0 and env.attempt == 1
    assert env.not_before == datetime(2026, 3, 21, 10, 15, 32, 623456, tzinfo=UTC)
    out = orjson.loads(env.to_json())
    assert out["enqueuedAt"] == "2026-03-21T10:15:30.123Z"
    assert out["notBefore"] == "2026-03-21T10:15:32.623456Z"
    assert out["headers"]["stem-signature-key"] == "primary"


def test_legacy_dart_local_times_are_local_and_written_back_unchanged() -> None:
    env = Envelope.from_json(raw("envelope_dart_legacy_local.json"))
    # Dart's DateTime.parse reads an offset-less time as local time; so do we.
    assert env.enqueued_at == datetime(2024, 10, 29, 10, 15, 30, 123456).astimezone(UTC)
    assert env.not_before == datetime(2024, 10, 29, 10, 20, 30, 123000).astimezone(UTC)
    assert env.id == "1730196930123456-2864434397" and env.visibility_timeout == 1.5
    out = orjson.loads(env.to_json())
    assert out["enqueuedAt"] == "2024-10-29T10:15:30.123456"
    assert out["notBefore"] == "2024-10-29T10:20:30.123"


def test_changed_times_are_written_in_our_format() -> None:
    env = Envelope.from_json(raw("envelope_dart_legacy_local.json"))
    moved = env.copy(attempt=1, not_before=datetime(2026, 1, 1, 0, 0, 0, 654321, tzinfo=UTC))
    out = orjson.loads(moved.to_json())
    assert out["notBefore"] == "2026-01-01T00:00:00.654Z"
    assert out["enqueuedAt"] == "2024-10-29T10:15:30.123456"  # untouched: as read


def test_unknown_envelope_keys_are_kept() -> None:
    env = Envelope.from_json(raw("envelope_unknown_fields.json"))
    assert set(env.extra) == {"routing", "schemaVersion"}
    assert env.extra["routing"]["broadcastChannel"] == "ops"


def test_our_envelopes_have_exactly_the_dart_keys_in_dart_order() -> None:
    env = Envelope.from_json(raw("python_envelope_gzip_args.json"))
    assert list(orjson.loads(env.to_json())) == DART_KEYS
    app = stem.Stem("w", broker="memory://wire-keys", backend="memory://wire-keys")
    built = app.build_envelope(app.definition("t").call(a=1))
    data = orjson.loads(built.to_json())
    assert list(data) == DART_KEYS
    # Ours: UTC, millisecond precision, 'Z' — what Dart's DateTime.parse reads as UTC.
    assert len(data["enqueuedAt"]) == 24 and data["enqueuedAt"].endswith("Z")


def test_dart_statuses_decode_field_by_field() -> None:
    ok = TaskStatus.from_json(raw("status_dart_succeeded.json"))
    assert ok.state is TaskState.SUCCEEDED and ok.payload["items"][2] == {"c": 1.5}
    assert (ok.task_name, ok.queue_name, ok.worker_id) == ("reports.build", "default",
                                                           "host-a-4242")
    assert ok.started_at == datetime(2026, 3, 21, 10, 15, 30, 200001, tzinfo=UTC)
    assert ok.completed_at == datetime(2026, 3, 21, 10, 15, 31, 234567, tzinfo=UTC)
    assert ok.created_at == datetime(2026, 3, 21, 10, 15, 30, 123456, tzinfo=UTC)
    assert ok.updated_at == ok.completed_at and ok.failed_at is None and ok.extra == {}

    retried = TaskStatus.from_json(raw("status_dart_retried.json"))
    assert retried.state is TaskState.RETRIED and retried.attempt == 1
    assert retried.error is not None and retried.error.retryable
    assert retried.error.type == "TimeoutException" and retried.error.meta == {}

    failed = TaskStatus.from_json(raw("status_dart_failed.json"))
    assert failed.error is not None and failed.error.meta == {"reason": "signature mismatch",
                                                              "keyId": "primary"}
    assert failed.failed_at == datetime(2026, 3, 21, 10, 15, 30, 987654, tzinfo=UTC)


def test_unknown_status_keys_survive_including_inside_the_error() -> None:
    st = TaskStatus.from_json(raw("status_unknown_fields.json"))
    assert st.extra == {"expiresAt": "2026-03-22T10:15:30.123Z", "groupId": None,
                        "updatedAt": "not a timestamp"}
    assert st.updated_at is None and st.created_at is not None
    assert st.error is not None
    assert st.error.extra == {"cause": {"type": "FormatException", "line": 3}}
    assert st.error.meta == {"hint": "check input"} and st.error.stack is None


def test_unknown_state_reads_as_queued_like_dart() -> None:
    st = TaskStatus.from_dict({"id": "x", "state": "paused"})
    assert st.state is TaskState.QUEUED


class DocsBase64Encoder:
    """The Dart docs' Base64PayloadEncoder (strings only; default id = class name)."""

    id = "Base64PayloadEncoder"

    def encode(self, value: Any) -> Any:
        return base64.b64encode(value.encode()).decode() if isinstance(value, str) else value

    def decode(self, data: Any) -> Any:
        return base64.b64decode(data).decode() if isinstance(data, str) else data


def test_a_dart_result_decodes_with_an_equivalent_encoder_registered() -> None:
    app = stem.Stem("w", broker="memory://wire-b64", backend="memory://wire-b64",
                    encoders=TaskPayloadEncoderRegistry(encoders=[DocsBase64Encoder()]))
    res = app.to_result(TaskStatus.from_json(raw("status_dart_custom_encoder.json")))
    assert res.value == '{"ok":true}' and res.raw_payload == "eyJvayI6dHJ1ZX0="
    plain = stem.Stem("w", broker="memory://wire-b64", backend="memory://wire-b64")
    with pytest.raises(stem.PayloadEncodingError, match="Base64PayloadEncoder"):
        plain.to_result(TaskStatus.from_json(raw("status_dart_custom_encoder.json")))


def test_our_golden_payloads_still_decode() -> None:
    reg = TaskPayloadEncoderRegistry(
        args_encoder=GzipJsonPayloadEncoder(),
        result_encoder=AesGcmPayloadEncoder({"2026-03": bytes(range(32))}),
    )
    env = Envelope.from_json(raw("python_envelope_gzip_args.json"))
    assert reg.decode_args(env.args, env.headers[ARGS_ENCODER_HEADER]) == {
        "customer": "cust-1001", "amounts": [1250.75, 430.0]}
    st = TaskStatus.from_json(raw("python_status_aes_result.json"))
    assert reg.decode_result(st.payload, st.meta["__stemResultEncoder"]) == {
        "total": 1680.75, "lines": ["a", "b"]}
