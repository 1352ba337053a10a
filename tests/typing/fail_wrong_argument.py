"""Wrong argument types for typed enqueue/call must be mypy errors (see the E: markers)."""

from __future__ import annotations

import stem

app = stem.Stem("typing", broker="memory://typing", backend="memory://typing")


@app.task(name="math.add")
async def add(x: int, y: int = 1) -> int:
    return x + y


@app.task
def greet(ctx: stem.TaskContext, name: str, *, loud: bool = False) -> str:
    return name


async def produce() -> None:
    await add.enqueue("one")  # E: Argument 1 to "enqueue" of "TaskDefinition" has incompatible type "str"; expected "int"
    await add.enqueue(1, z=2)  # E: Unexpected keyword argument "z" for "enqueue" of "TaskDefinition"
    await add.enqueue()  # E: Missing positional argument "x" in call to "enqueue" of "TaskDefinition"
    add.call(1.5)  # E: Argument 1 to "call" of "TaskDefinition" has incompatible type "float"; expected "int"
    greet.call(name=3)  # E: Argument "name" to "call" of "TaskDefinition" has incompatible type "int"; expected "str"
    greet.call("ada", True)  # E: Too many positional arguments for "call" of "TaskDefinition"
    greet.call("ada").with_options(priority="high")  # E: Argument "priority" to "with_options" of "TaskCall" has incompatible type "str"; expected "int | None"


def produce_sync() -> None:
    add.delay("one")  # E: Argument 1 to "delay" of "TaskDefinition" has incompatible type "str"; expected "int"
    add.enqueue_sync(1, z=2)  # E: Unexpected keyword argument "z" for "enqueue_sync" of "TaskDefinition"
    greet.delay("ada", True)  # E: Too many positional arguments for "delay" of "TaskDefinition"
    count: int = add.delay(1)  # E: Incompatible types in assignment (expression has type "str", variable has type "int")
