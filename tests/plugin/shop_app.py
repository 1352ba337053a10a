"""A user's app module, as a project would write it: no URLs, Stem's defaults."""

from __future__ import annotations

from typing import Any

import stem

app = stem.Stem("shop", routes={"payments.*": "payments"})


@app.task(name="payments.charge", max_retries=2)
def charge(amount: int, rate: float) -> dict[str, Any]:
    if amount < 0:
        raise ValueError(f"cannot charge {amount}")
    return {"amount": amount, "total": amount * rate}


@app.task(name="email.send")
async def send_email(ctx: stem.TaskContext, to: str) -> str:
    ctx.progress(100, {"to": to})
    return f"sent to {to}"
