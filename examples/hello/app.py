"""The hello example: three tasks on the default SQLite store (no server needed)."""

from __future__ import annotations

import asyncio

import stem

app = stem.Stem("hello")


@app.task(name="hello.greet")
async def greet(name: str) -> str:
    """Say hello."""
    return f"Hello, {name}!"


@app.task(name="hello.flaky", max_retries=2,
          retry_strategy=stem.ExponentialJitterRetryStrategy(base=0.5))
def flaky(ctx: stem.TaskContext, order_id: int) -> str:
    """Fails on its first attempt (a flaky dependency), succeeds on the retry."""
    if ctx.attempt == 0:
        raise ConnectionError("payment gateway timed out")
    return f"order {order_id} charged on attempt {ctx.attempt}"


@app.task(name="hello.report")
async def report(ctx: stem.TaskContext, pages: int) -> dict[str, int]:
    """Reports progress while it renders pages."""
    for page in range(1, pages + 1):
        await asyncio.sleep(0.05)
        ctx.progress(100 * page / pages, data={"page": page})
    return {"pages": pages}
