"""Typed results: ``decode=`` turns stored JSON into application objects; in process."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

import stem
from stem import TaskDefinition, TaskState
from stem.encoding import TaskPayloadEncoderRegistry
from tests.helpers import running_worker


@dataclass(frozen=True)
class Receipt:
    order: str
    total: float
    paid_at: str

    @classmethod
    def from_json(cls, data: Any) -> Receipt:
        return cls(order=data["order"], total=data["total"], paid_at=data["paid_at"])


PAID = datetime(2026, 3, 21, 10, 15, 30, tzinfo=UTC)


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    app = stem.Stem("typed", broker=f"memory://{namespace}", backend=f"memory://{namespace}")

    @app.task(name="billing.charge", decode=Receipt.from_json)
    async def charge(order: str, amount: float) -> Receipt:
        return Receipt(order, amount, PAID.isoformat())

    @app.task(name="billing.raw")
    async def raw(order: str) -> dict[str, Any]:
        return {"order": order, "when": PAID, "receipt": Receipt(order, 1.0, "x")}

    @app.task(name="billing.bad")
    async def bad() -> object:
        return {"ids": {1, 2}}

    return app


async def test_decode_on_the_task_gives_the_caller_an_object(app: stem.Stem) -> None:
    charge = app.tasks["billing.charge"]
    async with running_worker(app):
        res = await charge.wait(await charge.enqueue("o-1", 9.5), timeout=5)
    assert res.value == Receipt("o-1", 9.5, PAID.isoformat())
    # What is stored (and what app.wait without decode gives) is plain JSON.
    assert res.raw_payload == {"order": "o-1", "total": 9.5, "paid_at": PAID.isoformat()}


async def test_a_producer_without_the_handler_decodes_with_its_own_definition(
    app: stem.Stem, namespace: str
) -> None:
    producer = stem.Stem("producer", broker=f"memory://{namespace}",
                         backend=f"memory://{namespace}", namespace=app.namespace)
    charge: TaskDefinition[[str, float], Receipt] = TaskDefinition(
        "billing.charge", params=("order", "amount"), decode=Receipt.from_json, app=producer)
    async with running_worker(app):
        tid = await charge.enqueue("o-2", 3.0)
        typed = await charge.wait(tid, timeout=5)
        plain = await producer.wait(tid, timeout=5)
    assert typed.value == Receipt("o-2", 3.0, PAID.isoformat())
    assert plain.value == {"order": "o-2", "total": 3.0, "paid_at": PAID.isoformat()}


async def test_default_results_are_plain_json_values(app: stem.Stem) -> None:
    async with running_worker(app):
        res = await app.wait(await app.enqueue("billing.raw", "o-3"), timeout=5)
    assert res.value == {"order": "o-3", "when": "2026-03-21T10:15:30+00:00",
                         "receipt": {"order": "o-3", "total": 1.0, "paid_at": "x"}}


async def test_a_result_with_no_json_form_fails_the_task_instead_of_stalling(
    app: stem.Stem
) -> None:
    async with running_worker(app):
        bad = await app.wait(await app.enqueue("billing.bad"), timeout=5)
        after = await app.wait(await app.enqueue("billing.raw", "o-4"), timeout=5)
    assert bad.state is TaskState.FAILED and bad.error is not None
    assert bad.error.type == "PayloadEncodingError" and "not JSON-serialisable" in bad.error.message
    assert after.state is TaskState.SUCCEEDED  # the worker's result pipeline kept going


def test_result_encoding_normalises_to_plain_json() -> None:
    reg = TaskPayloadEncoderRegistry()
    assert reg.encode_result(Receipt("a", 1.0, "t")) == (
        {"order": "a", "total": 1.0, "paid_at": "t"}, "json")
    assert reg.encode_result((1, "two")) == ([1, "two"], "json")
    for scalar in (None, "s", True, 1.5, 2**63):
        assert reg.encode_result(scalar) == (scalar, "json")
    with pytest.raises(stem.PayloadEncodingError, match="not JSON-serialisable"):
        reg.encode_result(2**70)
