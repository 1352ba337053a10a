"""Typed task usage that must type-check cleanly (mypy --strict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import stem

app = stem.Stem("typing", broker="memory://typing", backend="memory://typing")


@dataclass
class Receipt:
    order: str
    total: float

    @classmethod
    def from_json(cls, data: Any) -> Receipt:
        return cls(order=str(data["order"]), total=float(data["total"]))


@app.task(name="math.add", queue="math")
async def add(x: int, y: int = 1) -> int:
    return x + y


@app.task
def greet(ctx: stem.TaskContext, name: str, *, loud: bool = False) -> str:
    return f"hi {name} on attempt {ctx.attempt}" + ("!" if loud else "")


#: A producer-side definition for a task whose handler lives elsewhere.
charge: stem.TaskDefinition[[str, float], Receipt] = stem.TaskDefinition(
    "billing.charge", params=("order", "amount"), decode=Receipt.from_json, app=app
)


async def produce() -> None:
    tid: str = await add.enqueue(1, y=2)
    total: int | None = (await add.wait(tid, timeout=5)).value
    result: stem.TaskResult[int] = await add.wait(tid)
    if result.value is not None:
        doubled: int = result.value * 2
        del doubled
    del total

    call: stem.TaskCall[str] = greet.call("ada", loud=True).with_options(
        queue="q", priority=9, countdown=5, headers={"h": "v"}, meta={"m": 1},
        time_limit=3.0, max_retries=2,
    )
    await app.enqueue_call(call)
    text: str | None = (await greet.wait(await greet.enqueue("bob"))).value
    del text

    anything = await app.wait(tid)  # by id alone: TaskResult[Any]
    loose: str | None = anything.value
    decoded: stem.TaskResult[Receipt] = await app.wait(tid, decode=Receipt.from_json)
    del loose, decoded

    receipt_id = await charge.enqueue("o-1", 9.5)
    receipt = (await charge.wait(receipt_id)).value
    if receipt is not None:
        cents: float = receipt.total * 100
        del cents


def produce_sync() -> None:
    """From sync code: the same ParamSpec-checked arguments, the id back as a str."""
    tid: str = add.enqueue_sync(1, y=2)
    also: str = add.delay(3)
    greeted: str = greet.delay("ada", loud=True)
    by_name: str = app.enqueue_sync("math.add", 1, y=2)
    module_level: str = stem.enqueue_sync("math.add", x=1)
    value: int | None = add.wait_sync(tid, timeout=5).value
    untyped = app.wait_sync(also)
    loose: str | None = untyped.value
    declared = app.definition("payments.charge", queue="payments", params=["amount", "to"])
    charged: str = declared.delay(5, to="a")
    del greeted, by_name, module_level, value, loose, charged


async def produce_module_level() -> None:
    tid: str = await stem.enqueue("math.add", 1, y=2)
    done: stem.TaskResult[object] = await stem.wait(tid, timeout=5)
    maybe: stem.TaskResult[object] | None = await stem.get_result(tid)
    del done, maybe
