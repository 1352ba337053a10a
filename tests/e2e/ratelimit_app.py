"""The app of the rate-limit process tests: one task limited to 20 starts a second,
across every worker; it returns when and where it started."""

from __future__ import annotations

import os
import time

import stem

app = stem.Stem("ratelimit-e2e")


@app.task(name="e2e.limited", rate_limit="20/s")
async def limited() -> list[float]:
    return [time.time(), float(os.getpid())]
