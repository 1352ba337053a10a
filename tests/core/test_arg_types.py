"""Handlers annotated with types JSON cannot carry get those types back (docs/producer.md,
"Argument types"); a value that does not convert is dead-lettered, never retried."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

import stem
from stem import TaskArgumentError, TaskState
from tests.core.arg_types_app import (
    SPEC,
    STRICT_CALLS,
    Color,
    Customer,
    Level,
    Line,
    Order,
    make_app,
)
from tests.helpers import eventually, running_worker


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    return make_app(f"memory://{namespace}")


def every_type() -> dict[str, Any]:
    """One value of every type in the table, as a producer passes them."""
    return {
        "at": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2))),
        "naive": datetime(2024, 5, 1, 12, 30),
        "day": date(2024, 2, 29),
        "clock": time(23, 59, 58, 500),
        "ident": uuid4(),
        "amount": "19.99",  # Decimal travels as a string; the handler gets a Decimal
        "color": Color.GREEN,
        "level": Level.HIGH,
        "order": Order(uuid4(), datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
                       [Line(uuid4()), Line(uuid4(), 3, date(2024, 1, 3))],
                       Color.RED, {"gift": True}),
        "customer": Customer(name="Ada", since=date(2020, 1, 1), tags=["vip"]),
        "maybe": None,
        "old_style": uuid4(),
        "ids": [uuid4(), uuid4()],
        "prices": {"a": "1.10", "b": 2, "c": 0.3},
        "sizes": [1, 2, 3],
        "tagged": uuid4(),
        "count": 7,
        "raw": {"at": "2024-01-01"},
    }


def expected(sent: dict[str, Any]) -> dict[str, str]:
    """The ``repr`` of what the handler must receive for ``sent``."""
    want = dict(sent)
    want["amount"] = Decimal(sent["amount"])
    want["prices"] = {"a": Decimal("1.10"), "b": Decimal(2), "c": Decimal("0.3")}
    want["sizes"] = tuple(sent["sizes"])
    return {k: repr(v) for k, v in want.items()}


def received(value: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in value.items() if k != "pid"}


async def test_every_type_in_the_table_comes_back_as_annotated(app: stem.Stem) -> None:
    sent = every_type()
    async with running_worker(app):
        res = await app.wait(await app.enqueue("types.all", **sent), timeout=10)
    assert res.state is TaskState.SUCCEEDED, res.error
    assert received(res.value) == expected(sent)
    # orjson writes a naive datetime without an offset, and it stays naive.
    assert res.value["naive"] == "datetime.datetime(2024, 5, 1, 12, 30)"


async def test_optional_values_and_enum_names_convert(app: stem.Stem) -> None:
    sent = {**every_type(), "maybe": datetime(2030, 1, 1, tzinfo=UTC)}
    wire = {**sent, "color": "GREEN", "level": 2}  # an enum by name, or by value
    async with running_worker(app):
        res = await app.wait(await app.enqueue("types.all", **wire), timeout=10)
    assert received(res.value) == expected(sent)


async def test_the_conversion_happens_in_a_process_pool_child(namespace: str) -> None:
    app = make_app(f"memory://{namespace}", pool=True)
    sent = every_type()
    async with running_worker(app, app_spec=SPEC):
        res = await app.wait(await app.enqueue("types.all_in_child", **sent), timeout=30)
    assert res.state is TaskState.SUCCEEDED, res.error
    assert res.value["pid"] != str(os.getpid())
    assert received(res.value) == expected(sent)


async def test_sqlite_round_trip(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'stem.db'}")
    sent = every_type()
    async with running_worker(app):
        res = await app.wait(await app.enqueue("types.all", **sent), timeout=10)
    assert received(res.value) == expected(sent)


def test_values_already_of_the_type_pass_through_unchanged(app: stem.Stem) -> None:
    sent = {**every_type(), "amount": Decimal("19.99"), "sizes": (1, 2)}
    _, kwargs = app.tasks["types.all"].call_arguments(sent)
    for name in ("at", "ident", "amount", "order", "customer", "color", "sizes", "raw"):
        assert kwargs[name] is sent[name], name


async def test_a_handler_without_annotations_gets_the_json_values(app: stem.Stem) -> None:
    ident = uuid4()
    async with running_worker(app):
        res = await app.wait(await app.enqueue(
            "types.plain", datetime(2024, 1, 1, tzinfo=UTC), ident, Color.RED), timeout=10)
    assert res.value == {"at": "'2024-01-01T00:00:00+00:00'", "ident": repr(str(ident)),
                         "amount": "'red'"}


@pytest.mark.parametrize(("args", "reason"), [
    ({"ident": "not-a-uuid"},
     "argument 'ident': cannot convert 'not-a-uuid' to UUID: badly formed"),
    ({"ident": str(uuid4()), "when": "yesterday"},
     "argument 'when': cannot convert 'yesterday' to datetime | None: Invalid isoformat"),
    ({"ident": 12},
     "argument 'ident': cannot convert 12 to UUID: expected a UUID string, got int"),
])
async def test_a_value_that_does_not_convert_is_dead_lettered_not_retried(
        app: stem.Stem, args: dict[str, Any], reason: str) -> None:
    """``types.strict`` has max_retries=3: bad input fails at once, the handler never runs."""
    async with running_worker(app):
        tid = await app.enqueue("types.strict", **args)
        res = await app.wait(tid, timeout=10)
        [dead] = await eventually(lambda: app.broker.dead_letters("default"))
    assert res.state is TaskState.FAILED and res.attempt == 0
    assert res.error is not None and res.error.type == "TaskArgumentError"
    assert f"task 'types.strict': {reason}" in res.error.message
    assert dead.id == tid and reason in dead.reason
    assert tid not in STRICT_CALLS


def test_a_bad_value_in_a_nested_type_says_where() -> None:
    app = make_app("memory://unused")
    order = {"id": str(uuid4()), "placed": "2024-01-01T00:00:00",
             "lines": [{"sku": str(uuid4())}, {"sku": "x", "qty": 2}]}
    with pytest.raises(TaskArgumentError,
                       match=r"argument 'order': cannot convert .* to Order: field 'lines': "
                             r"item 1: field 'sku': badly formed"):
        app.tasks["types.all"].call_arguments({**every_type(), "order": order})
    with pytest.raises(TaskArgumentError, match=r"to Customer: .*since"):
        app.tasks["types.all"].call_arguments({**every_type(), "customer": {"name": "x"}})


def test_hints_that_cannot_be_resolved_mean_no_conversion() -> None:
    app = stem.Stem("fwd", broker="memory://fwd", backend="memory://fwd")

    @app.task(name="fwd")
    def fwd(x: NotDefinedAnywhere, y: UUID) -> None:  # type: ignore[name-defined]  # noqa: F821
        ...

    assert app.tasks["fwd"].call_arguments({"x": "1", "y": "2"}) == ([], {"x": "1", "y": "2"})


def test_stem_does_not_import_pydantic() -> None:
    code = ("import sys, stem\n"
            "app = stem.Stem('p', broker='memory://p', backend='memory://p')\n"
            "from datetime import datetime\n"
            "@app.task(name='t')\n"
            "def t(at: datetime) -> None: ...\n"
            "print(app.tasks['t'].call_arguments({'at': '2024-01-01'})[1]['at'].year,\n"
            "      'pydantic' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["2024", "False"]
