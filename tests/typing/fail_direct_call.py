"""Direct calls of tasks are typed by the handler (see the E: markers)."""

from __future__ import annotations

from typing import Any

import stem

app = stem.Stem("typing", broker="memory://typing", backend="memory://typing")


@app.task(name="payments.charge")
def charge(amount: int, rate: float) -> dict[str, Any]:
    return {"total": amount * rate}


@app.task(name="email.send")
async def send(to: str) -> int:
    return len(to)


async def call() -> None:
    charge("1", 2.0)  # E: Argument 1 to "__call__" of "SyncTaskDefinition" has incompatible type "str"; expected "int"
    text: str = charge(1, 2.0)  # E: Incompatible types in assignment (expression has type "dict[str, Any]", variable has type "str")
    count: int = send("a")  # E: Incompatible types in assignment (expression has type "Coroutine[Any, Any, int]", variable has type "int")
    wrong: str = await send("a")  # E: Incompatible types in assignment (expression has type "int", variable has type "str")
    await charge.enqueue(1, rate="x")  # E: Argument "rate" to "enqueue" of "TaskDefinition" has incompatible type "str"; expected "float"
    del text, count, wrong
