"""Payload encoders end to end, on every broker and result backend in ADAPTERS.

What travels is checked on the raw bytes the broker hands out and the statuses the
backend stores: encrypted/compressed args and results, the encoder ids in header
``stem-args-encoder`` / meta ``__stemArgsEncoder`` / status meta ``__stemResultEncoder``,
per-task overrides used by that task only, and bad payloads dead-lettered with a reason.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

import stem
from stem import PayloadEncodingError, TaskState
from stem._time import to_iso, utcnow
from stem.encoding import (
    ARGS_ENCODER_HEADER,
    ARGS_ENCODER_META,
    RESULT_ENCODER_META,
    AesGcmPayloadEncoder,
    GzipJsonPayloadEncoder,
    TaskPayloadEncoderRegistry,
)
from stem.ports import Broker, Delivery, ResultBackend
from tests.helpers import eventually, running_worker

Q = "enc"
WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"
KEY_2025, KEY_2026 = bytes(range(32)), bytes(range(50, 82))
AES_KEYS = {"aes-gcm": {"keyId", "nonce", "ciphertext", "mac"}}


def make_app(broker: Broker, backend: ResultBackend, registry: TaskPayloadEncoderRegistry | None
             = None, *, task_aes: AesGcmPayloadEncoder | None = None) -> stem.Stem:
    """An app with three tasks: plain, per-task AES args+result, per-task gzip result."""
    app = stem.Stem("enc", broker=broker, backend=backend, encoders=registry, default_queue=Q)
    task_aes = task_aes or AesGcmPayloadEncoder({"2026": KEY_2026})

    @app.task(name="enc.echo")
    async def echo(payload: dict[str, Any], n: int = 0) -> dict[str, Any]:
        return {"payload": payload, "n": n}

    @app.task(name="enc.card", args_encoder=task_aes, result_encoder=task_aes)
    def card(number: str) -> str:
        return f"****{number[-4:]}"

    @app.task(name="enc.report", result_encoder=GzipJsonPayloadEncoder())
    async def report(rows: int) -> list[dict[str, Any]]:
        return [{"row": i, "status": "ok"} for i in range(rows)]

    @app.task(name="secure.report")  # the task named by a Dart fixture
    async def secure(**kwargs: Any) -> None:
        return None

    return app


async def fetch_raw(broker: Broker, queue: str = Q, n: int = 1) -> list[Delivery]:
    """Lease ``n`` deliveries (polling), to look at the bytes a worker would get."""
    got: list[Delivery] = []

    async def more() -> bool:
        got.extend(await broker.fetch([queue], n - len(got), block=0.05, consumer="peek"))
        return len(got) >= n

    await eventually(more)
    return got


def wire(d: Delivery) -> dict[str, Any]:
    data = orjson.loads(d.raw)
    assert isinstance(data, dict)
    return data


async def test_default_encoders_encrypt_args_and_results_end_to_end(
    broker: Broker, backend: ResultBackend
) -> None:
    aes = AesGcmPayloadEncoder({"2026": KEY_2026})
    app = make_app(broker, backend, TaskPayloadEncoderRegistry(args_encoder=aes,
                                                               result_encoder=aes))
    tid = await app.enqueue("enc.echo", {"card": "4111111111111111"}, n=3)

    [d] = await fetch_raw(broker)
    data = wire(d)
    assert b"4111111111111111" not in d.raw
    assert set(data["args"]) == AES_KEYS["aes-gcm"] and data["args"]["keyId"] == "2026"
    assert data["headers"][ARGS_ENCODER_HEADER] == data["meta"][ARGS_ENCODER_META] == "aes-gcm"
    await broker.nack([d])

    async with running_worker(app, queues=[Q]):
        res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.SUCCEEDED
    assert res.value == {"payload": {"card": "4111111111111111"}, "n": 3}
    stored = await backend.get(tid)
    assert stored is not None and stored.meta[RESULT_ENCODER_META] == "aes-gcm"
    assert set(stored.payload) == AES_KEYS["aes-gcm"]
    assert "4111" not in orjson.dumps(stored.payload).decode()
    assert res.raw_payload == stored.payload


async def test_per_task_override_is_used_only_by_that_task(
    broker: Broker, backend: ResultBackend
) -> None:
    app = make_app(broker, backend)  # registry defaults: JSON both ways
    ids = {
        "echo": await app.enqueue("enc.echo", {"x": 1}),
        "card": await app.enqueue("enc.card", "4111111111111111"),
        "report": await app.enqueue("enc.report", rows=50),
    }
    leased = await fetch_raw(broker, n=3)
    by_name = {wire(d)["name"]: wire(d) for d in leased}
    assert by_name["enc.echo"]["args"] == {"payload": {"x": 1}}
    assert by_name["enc.echo"]["headers"][ARGS_ENCODER_HEADER] == "json"
    assert set(by_name["enc.card"]["args"]) == AES_KEYS["aes-gcm"]
    assert by_name["enc.card"]["headers"][ARGS_ENCODER_HEADER] == "aes-gcm"
    assert by_name["enc.card"]["meta"][ARGS_ENCODER_META] == "aes-gcm"
    assert by_name["enc.report"]["args"] == {"rows": 50}  # only its result is overridden
    await broker.nack(leased)

    async with running_worker(app, queues=[Q], consumer_name="w-override"):
        results = {k: await app.wait(v, timeout=15) for k, v in ids.items()}
    assert results["echo"].value == {"payload": {"x": 1}, "n": 0}
    assert results["card"].value == "****1111"
    assert results["report"].value == [{"row": i, "status": "ok"} for i in range(50)]
    stored = {k: await backend.get(v) for k, v in ids.items()}
    encoders = {k: s.meta[RESULT_ENCODER_META] for k, s in stored.items() if s is not None}
    assert encoders == {"echo": "json", "card": "aes-gcm", "report": "gzip-json"}
    assert stored["echo"] is not None and stored["echo"].payload == {"payload": {"x": 1}, "n": 0}
    assert stored["report"] is not None and set(stored["report"].payload) == {"gzip"}


async def test_another_app_with_the_same_registry_decodes_stored_results(
    broker: Broker, backend: ResultBackend
) -> None:
    def registry() -> TaskPayloadEncoderRegistry:  # fresh objects, same configuration
        return TaskPayloadEncoderRegistry(
            args_encoder=GzipJsonPayloadEncoder(),
            result_encoder=AesGcmPayloadEncoder({"2025": KEY_2025, "2026": KEY_2026},
                                                primary="2026"),
        )

    worker_app = make_app(broker, backend, registry())
    producer = stem.Stem("producer", broker=broker, backend=backend, encoders=registry(),
                         default_queue=Q)
    tid = await producer.enqueue("enc.echo", payload={"rows": list(range(100))})
    async with running_worker(worker_app, queues=[Q]):
        res = await producer.wait(tid, timeout=10)
    assert res.value == {"payload": {"rows": list(range(100))}, "n": 0}
    # A reader that only has the old key cannot read it, and says why.
    reader = stem.Stem("reader", broker=broker, backend=backend,
                       encoders=TaskPayloadEncoderRegistry(
                           result_encoder=AesGcmPayloadEncoder({"2025": KEY_2025})))
    try:
        await reader.get_result(tid)
    except PayloadEncodingError as exc:
        assert "'2026', which this process does not have" in str(exc)
    else:
        raise AssertionError("a reader without the key decoded an encrypted result")


async def assert_dead_lettered(app: stem.Stem, broker: Broker, tid: str, *needles: str) -> None:
    res = await app.wait(tid, timeout=10)
    assert res.state is TaskState.FAILED and res.error is not None
    assert res.error.type == "PayloadEncodingError"
    for needle in needles:
        assert needle in res.error.message
    dead = await eventually(lambda: broker.dead_letters(Q))
    assert [d.envelope.id for d in dead if d.envelope is not None] == [tid]
    for needle in needles:
        assert needle in dead[0].reason
    assert res.meta.get("deadLetterReason") == dead[0].reason


async def test_wrong_key_dead_letters_with_the_reason(
    broker: Broker, backend: ResultBackend
) -> None:
    producer = make_app(broker, backend, task_aes=AesGcmPayloadEncoder({"2025": KEY_2025}))
    worker_app = make_app(broker, backend, task_aes=AesGcmPayloadEncoder({"2026": KEY_2026}))
    tid = await producer.enqueue("enc.card", "4111111111111111")
    async with running_worker(worker_app, queues=[Q]):
        await assert_dead_lettered(producer, broker, tid, "'2025'", "does not have")


async def test_right_key_id_wrong_key_fails_authentication(
    broker: Broker, backend: ResultBackend
) -> None:
    producer = make_app(broker, backend, task_aes=AesGcmPayloadEncoder({"k": KEY_2025}))
    worker_app = make_app(broker, backend, task_aes=AesGcmPayloadEncoder({"k": KEY_2026}))
    tid = await producer.enqueue("enc.card", "4111111111111111")
    async with running_worker(worker_app, queues=[Q]):
        await assert_dead_lettered(producer, broker, tid, "failed authentication")


async def test_tampered_args_dead_letter(broker: Broker, backend: ResultBackend) -> None:
    app = make_app(broker, backend)
    env = app.build_envelope(app.tasks["enc.card"].call("4111111111111111"))
    ct = bytearray(base64.b64decode(env.args["ciphertext"]))
    ct[-1] ^= 0x01
    await broker.publish([env.copy(args={**env.args, "ciphertext": base64.b64encode(ct).decode()})])
    async with running_worker(app, queues=[Q]):
        await assert_dead_lettered(app, broker, env.id, "failed authentication", "tampered")


async def test_unknown_encoder_id_from_a_dart_producer_dead_letters(
    broker: Broker, backend: ResultBackend
) -> None:
    data = orjson.loads((WIRE / "envelope_dart_custom_encoder.json").read_bytes())
    data["queue"] = Q
    await broker.publish_raw(Q, orjson.dumps(data))
    app = make_app(broker, backend)
    async with running_worker(app, queues=[Q]):
        await assert_dead_lettered(app, broker, data["id"], "unknown payload encoder",
                                   "'example-aes'")


async def test_typed_call_options_reach_the_envelope(
    broker: Broker, backend: ResultBackend
) -> None:
    app = make_app(broker, backend)
    echo = app.tasks["enc.echo"]
    eta = utcnow() - timedelta(seconds=1)  # due now, so it can be fetched
    call = echo.call({"a": 1}, n=2).with_options(
        queue="enc-typed", priority=9, eta=eta, headers={"tenant": "acme"},
        meta={"trace": "t-1"}, time_limit=30.0, soft_time_limit=20.0, max_retries=4,
        visibility_timeout=45.0, task_id="typed-0001",
    )
    assert await app.enqueue_call(call) == "typed-0001"
    [d] = await fetch_raw(broker, "enc-typed")
    data = wire(d)
    assert data["id"] == "typed-0001" and data["name"] == "enc.echo"
    assert data["args"] == {"payload": {"a": 1}, "n": 2}
    assert (data["queue"], data["priority"], data["maxRetries"]) == ("enc-typed", 9, 4)
    assert data["visibilityTimeout"] == 45000 and data["notBefore"] == to_iso(eta)
    # A tracer provider another test of this process set adds the W3C trace headers.
    headers = {k: v for k, v in data["headers"].items() if k not in ("traceparent", "tracestate")}
    assert headers == {"tenant": "acme", ARGS_ENCODER_HEADER: "json"}
    assert data["meta"]["trace"] == "t-1" and data["meta"][ARGS_ENCODER_META] == "json"
    # Per-call limits travel under the Dart Stem's keys, in milliseconds.
    assert data["meta"]["stem.timeLimitMs"] == 30000
    assert data["meta"]["stem.softTimeLimitMs"] == 20000
    assert "timeLimit" not in data["meta"] and "softTimeLimit" not in data["meta"]
    assert d.envelope is not None and d.envelope.priority == 9
    await broker.ack([d])

    later = await app.enqueue_call(echo.call({"b": 2}).with_options(countdown=60))
    stats = await broker.stats(Q)
    assert (stats.pending, stats.delayed) == (0, 1)
    assert await broker.fetch([Q], 1, block=0, consumer="peek") == []
    assert later
