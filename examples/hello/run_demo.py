"""`make demo`: start a worker process, enqueue a few tasks, print their results, stop it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples.hello.app import app, flaky, greet, report  # noqa: E402


async def main() -> int:
    print(f"broker: {app.broker_url} (the SQLite default; no server needed), "
          f"namespace: {app.namespace} (the worker runs this same app)")
    await app.broker.purge("default")
    worker = subprocess.Popen(  # noqa: ASYNC220 - a child we signal and wait for by hand
        [sys.executable, "-m", "stem_cli", "worker", "start", "--app", "examples.hello.app:app",
         "--block-time", "0.2", "--log-level", "WARNING"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        ids = {
            "greet": await greet.enqueue("world"),
            "flaky": await flaky.enqueue(order_id=42),
            "report": await report.enqueue(pages=5),
        }
        for label, task_id in ids.items():
            result = await app.wait(task_id, timeout=30)
            line = f"{label:>7}: {result.state.value:<9} attempt={result.attempt} value={result.value!r}"
            if result.progress:
                line += f" progress={result.progress['percent']:.0f}%"
            print(line)
        return 0
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        print(f"worker stopped (exit {code})")
        await app.close()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
