"""The Stem app the API enqueues into and the worker runs:
``stem worker start --app examples.fastapi_app.tasks:stem_app``."""

from __future__ import annotations

import asyncio
import os

import stem

stem_app = stem.Stem("fastapi_demo", broker=os.environ.get("STEM_BROKER_URL")
                     or "sqlite:///.stem/fastapi_demo.db")


@stem_app.task(name="reports.render")
async def render_report(ctx: stem.TaskContext, pages: int) -> dict[str, int]:
    """Render ``pages`` pages, reporting progress after each."""
    for page in range(1, pages + 1):
        await asyncio.sleep(0.05)
        ctx.progress(100 * page / pages, data={"page": page})
    return {"pages": pages}
