"""examples/retry_task: the worker's signal receivers print every retry, then success."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import ROOT


def test_run_prints_each_retry_with_delay_and_next_run_then_the_result(tmp_path: Path) -> None:
    env = {**os.environ, "STEM_BROKER_URL": f"sqlite:///{tmp_path / 'retry.db'}",
           "RETRY_DEMO_FAILURES": "2"}
    env.pop("STEM_RESULT_BACKEND_URL", None)
    out = subprocess.run([sys.executable, "examples/retry_task/run.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    retries = [line for line in out.stdout.splitlines() if line.startswith("retry:")]
    assert len(retries) == 2
    for attempt, (line, delay) in enumerate(zip(retries, ("0.50", "1.00"), strict=True)):
        assert re.fullmatch(
            rf"retry: retry_demo\.charge attempt={attempt} failed \(ConnectionError: gateway "
            rf"timed out \(attempt {attempt}\)\); delay={delay}s next run at "
            r"\d\d:\d\d:\d\d\.\d{3} UTC", line), line
    assert "success: retry_demo.charge attempt=2 -> 'order 42 charged on attempt 2'" in out.stdout
    assert "result: succeeded attempt=2" in out.stdout
