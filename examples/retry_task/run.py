"""`make example-retry`: a worker process, one flaky task, its retries as they happen.

Starts ``stem worker start --app examples.retry_task.app:app`` (its signal receivers
print each retry), enqueues ``charge``, waits for the result and stops the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples.retry_task.app import app, charge  # noqa: E402


async def main() -> int:
    print(f"broker: {app.broker_url}", flush=True)
    await app.broker.purge("default")
    worker = subprocess.Popen(  # noqa: ASYNC220 - a child we signal and wait for by hand
        [sys.executable, "-m", "stem_cli", "worker", "start", "--app",
         "examples.retry_task.app:app", "--block-time", "0.2", "--log-level", "WARNING",
         "--connect-timeout", "30"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        task_id = await charge.enqueue(order_id=42)
        result = await app.wait(task_id, timeout=60)
        print(f"result: {result.state.value} attempt={result.attempt} value={result.value!r}",
              flush=True)
        return 0 if result.state.value == "succeeded" else 1
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        await app.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
