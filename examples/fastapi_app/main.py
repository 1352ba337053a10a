"""A FastAPI service that enqueues on POST and reports status and progress on GET.

Run it with ``uvicorn examples.fastapi_app.main:api`` and a worker with
``stem worker start --app examples.fastapi_app.tasks:stem_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from examples.fastapi_app.tasks import render_report, stem_app


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    # Fail at startup, not on the first request, when the broker is unreachable; close
    # the app's connections (opened on this event loop) when the server stops.
    await stem_app.broker.ping()
    try:
        yield
    finally:
        await stem_app.close()


api = FastAPI(title="reports", lifespan=lifespan)


class ReportRequest(BaseModel):
    pages: int = Field(ge=1, le=1000)


@api.post("/reports", status_code=202)
async def create_report(request: ReportRequest) -> dict[str, str]:
    task_id = await render_report.enqueue(pages=request.pages)
    return {"id": task_id, "status": f"/reports/{task_id}"}


@api.get("/reports/{task_id}")
async def report_status(task_id: str) -> dict[str, Any]:
    status = await stem_app.backend.get(task_id)
    if status is None:
        raise HTTPException(404, f"no report {task_id}")
    result = stem_app.to_result(status)
    return {"id": task_id, "state": status.state.value, "attempt": status.attempt,
            "progress": result.progress, "value": result.value,
            "error": None if status.error is None else status.error.message}
