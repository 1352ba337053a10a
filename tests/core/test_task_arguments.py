"""Arguments and schedule options refused at enqueue, before anything is published."""

from __future__ import annotations

import dataclasses
import decimal
from datetime import UTC, datetime, timedelta

import pytest

import stem
from stem import ConfigurationError, TaskArgumentError


class Custom:
    pass


@pytest.fixture
def app(namespace: str) -> stem.Stem:
    app = stem.Stem("args", broker=f"memory://{namespace}", backend=f"memory://{namespace}")

    @app.task(name="charge")
    async def charge(order: str, amount: object = None, extra: object = None) -> None: ...

    return app


@pytest.mark.parametrize(("value", "type_name"), [
    (decimal.Decimal("9.99"), "Decimal"), (Custom(), "Custom"), ({1, 2}, "set"),
    ({"nested": [decimal.Decimal("1")]}, "dict"),
])
async def test_a_value_json_cannot_carry_names_the_argument(
        app: stem.Stem, value: object, type_name: str) -> None:
    with pytest.raises(TaskArgumentError, match=rf"task 'charge': argument 'amount' \({type_name}\)"):
        await app.enqueue("charge", "o-1", value)
    with pytest.raises(TaskArgumentError, match="argument 'extra'"):
        await app.tasks["charge"].enqueue("o-1", extra=value)
    with pytest.raises(TaskArgumentError, match="argument 'amount'"):
        await app.enqueue_many([app.tasks["charge"].call("o-2", 1),
                                app.tasks["charge"].call("o-3", value)])
    assert (await app.broker.stats("default")).pending == 0


async def test_values_orjson_carries_are_accepted(app: stem.Stem) -> None:
    @dataclasses.dataclass
    class Point:
        x: int

    await app.enqueue("charge", "o-1", datetime.now(UTC), extra=Point(1))
    assert (await app.broker.stats("default")).pending == 1


async def test_a_pydantic_model_travels_as_its_json_dump(app: stem.Stem) -> None:
    import pydantic

    class Customer(pydantic.BaseModel):
        name: str
        since: datetime

    model = Customer(name="Ada", since=datetime(2020, 1, 1, tzinfo=UTC))
    await app.enqueue("charge", "o-1", model)
    [delivery] = await app.broker.fetch(["default"], 1, block=0, consumer="test")
    assert delivery.envelope is not None
    assert delivery.envelope.args["amount"] == {"name": "Ada", "since": "2020-01-01T00:00:00Z"}


async def test_a_decimal_says_to_pass_a_string(app: stem.Stem) -> None:
    with pytest.raises(TaskArgumentError,
                       match=r"argument 'amount' \(Decimal\) .*pass str\(value\): a handler "
                             r"annotated Decimal gets a Decimal back"):
        await app.enqueue("charge", "o-1", decimal.Decimal("9.99"), extra={"fine": [1]})


def test_sync_enqueue_names_the_argument(app: stem.Stem) -> None:
    try:
        with pytest.raises(TaskArgumentError, match="argument 'amount' \\(Decimal\\)"):
            app.enqueue_sync("charge", "o-1", decimal.Decimal(1))
        with pytest.raises(TaskArgumentError, match="argument 'amount'"):
            app.tasks["charge"].delay("o-1", amount=Custom())
    finally:
        app.close_sync()


@pytest.mark.parametrize("countdown", [-1, -0.001, float("nan"), float("-inf"), "5"])
async def test_a_negative_countdown_is_refused(app: stem.Stem, countdown: object) -> None:
    with pytest.raises(ConfigurationError, match="countdown must be a number of seconds >= 0"):
        await app.enqueue("charge", "o-1", countdown=countdown)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="countdown"):
        app.tasks["charge"].call("o-1").with_options(countdown=countdown)  # type: ignore[arg-type]
    assert (await app.broker.stats("default")).pending == 0


@pytest.mark.parametrize("eta", [
    datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC),
    datetime(1, 1, 1), datetime(1960, 5, 1) - timedelta(days=1),
])
async def test_an_eta_before_1970_is_refused(app: stem.Stem, eta: datetime) -> None:
    with pytest.raises(ConfigurationError, match="eta must be 1970-01-01 UTC or later"):
        await app.enqueue("charge", "o-1", eta=eta)
    assert (await app.broker.stats("default")).pending == 0


async def test_a_task_call_built_directly_is_checked_when_published(app: stem.Stem) -> None:
    call = stem.TaskCall(app.tasks["charge"], {"order": "o"}, countdown=-5)
    with pytest.raises(ConfigurationError, match="countdown"):
        await app.enqueue_call(call)
    call = stem.TaskCall(app.tasks["charge"], {"order": "o"},
                         eta=datetime(1969, 1, 1, tzinfo=UTC))
    with pytest.raises(ConfigurationError, match="eta"):
        await app.enqueue_call(call)


async def test_zero_countdown_and_the_epoch_are_fine(app: stem.Stem) -> None:
    await app.enqueue("charge", "o-1", countdown=0)
    await app.enqueue("charge", "o-2", eta=datetime(1970, 1, 1, tzinfo=UTC))
    assert (await app.broker.stats("default")).pending == 2
