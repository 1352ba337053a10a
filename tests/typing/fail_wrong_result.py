"""Using a typed result as the wrong type must be a mypy error (see the E: markers)."""

from __future__ import annotations

import stem

app = stem.Stem("typing", broker="memory://typing", backend="memory://typing")


@app.task(name="math.add")
async def add(x: int, y: int = 1) -> int:
    return x + y


charge: stem.TaskDefinition[[str], bytes] = stem.TaskDefinition("billing.charge", params=("o",))


async def consume(task_id: str) -> None:
    as_text: str = (await add.wait(task_id)).value  # E: Incompatible types in assignment (expression has type "int | None", variable has type "str")
    value = (await add.wait(task_id, timeout=1)).value
    if value is not None:
        value.upper()  # E: "int" has no attribute "upper"
    wrong: stem.TaskResult[str] = await add.wait(task_id)  # E: Incompatible types in assignment (expression has type "TaskResult[int]", variable has type "TaskResult[str]")
    raw: bytes | None = (await charge.wait(task_id)).value
    count: int = raw  # E: Incompatible types in assignment (expression has type "bytes | None", variable has type "int")
    parsed: stem.TaskResult[int] = await app.wait(task_id, decode=bytes.fromhex)  # E: Argument "decode" to "wait" of "Stem" has incompatible type "Callable[[str], bytes]"
    del as_text, wrong, count, parsed
