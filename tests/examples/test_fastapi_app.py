"""examples/fastapi_app: POST enqueues, GET shows state and progress, lifespan wiring;
a real worker process runs the task."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

from fastapi.testclient import TestClient  # fastapi and httpx are dev dependencies

from tests.helpers import WorkerProcesses, wait_until


def test_post_enqueues_and_get_reports_progress_then_the_result(
        fresh_import: Callable[[str], ModuleType], workers: WorkerProcesses) -> None:
    main = fresh_import("examples.fastapi_app.main")
    with TestClient(main.api) as client:  # runs the lifespan (ping at start, close at end)
        created = client.post("/reports", json={"pages": 4})
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        queued = client.get(f"/reports/{task_id}").json()
        assert queued["state"] == "queued" and queued["progress"] is None

        workers.start("examples.fastapi_app.tasks:stem_app",
                      env={"STEM_BROKER_URL": os.environ["STEM_BROKER_URL"]})

        def done() -> dict[str, object] | None:
            body: dict[str, object] = client.get(f"/reports/{task_id}").json()
            return body if body["state"] == "succeeded" else None

        body = wait_until(done, timeout=30)
        assert body["value"] == {"pages": 4}
        assert isinstance(body["progress"], dict) and body["progress"]["percent"] == 100.0
        assert client.get("/reports/nope").status_code == 404
        assert client.post("/reports", json={"pages": 0}).status_code == 422
