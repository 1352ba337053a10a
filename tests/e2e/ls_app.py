"""An app for `stem tasks ls`: a task with a 60-character name (never truncated when piped)."""

from __future__ import annotations

import stem

app = stem.Stem("ls")

LONG_NAME = "billing.invoices.reconcile_monthly_statements_for_all_region"
assert len(LONG_NAME) == 60


@app.task(name=LONG_NAME, queue="billing", max_retries=2, priority=5)
async def reconcile() -> None: ...


@app.task(name="ls.short")
def short() -> None: ...
