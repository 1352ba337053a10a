"""A user's module as their type checker sees it: typed tasks through enqueue, wait,
eager mode and direct calls (mypy --strict clean)."""

from __future__ import annotations

from typing import Any

import stem
from stem.testing import eager, make_context

app = stem.Stem("shop", broker="memory://typing-user", backend="memory://typing-user")


@app.task(name="payments.charge")
def charge(amount: int, rate: float) -> dict[str, Any]:
    return {"total": amount * rate}


@app.task(name="email.send")
async def send(ctx: stem.TaskContext, to: str) -> int:
    ctx.progress(50)
    return len(to)


#: The decorator's result is a TaskDefinition[P, R] with the handler's P and R.
as_base: stem.TaskDefinition[[int, float], dict[str, Any]] = charge
as_sync: stem.SyncTaskDefinition[[int, float], dict[str, Any]] = charge
as_async: stem.AsyncTaskDefinition[[str], int] = send


async def use() -> None:
    with eager(app):
        tid: str = await charge.enqueue(1, 2.0)
        result: stem.TaskResult[dict[str, Any]] = await charge.wait(tid)
        if result.value is not None:
            total: Any = result.value["total"]
            del total
    direct: dict[str, Any] = charge(1, 2.0)  # a def handler: its value
    length: int = await send("a@example.com")  # an async one: the coroutine to await
    ctx = make_context(task_id="t-1", attempt=1, meta={"k": 1}, app=app)
    assert send.func is not None  # the raw handler (untyped: it takes the context first)
    await send.func(ctx, "b@example.com")
    leases: list[float | None] = ctx.calls.leases
    del direct, length, leases
