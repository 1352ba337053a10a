"""Handlers with annotated arguments, for tests/core/test_arg_types.py.

``make_app(url)`` builds a fresh app per test; the module-level ``app`` is what a
process-pool child imports (``tests.core.arg_types_app:app``): same task names, same
handlers. Each handler returns the ``repr`` of what it received, so a test sees the
types the handler got even when it ran in another process.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, Optional
from uuid import UUID

import pydantic

import stem

SPEC = "tests.core.arg_types_app:app"

#: Task ids of the calls ``types.strict`` received (in-process workers only).
STRICT_CALLS: list[str] = []


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True)
class Line:
    sku: UUID
    qty: int = 1
    shipped: date | None = None


@dataclass
class Order:
    id: UUID
    placed: datetime
    lines: list[Line]
    color: Color | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class Customer(pydantic.BaseModel):
    name: str
    since: date
    tags: list[str] = []


def all_types(ctx: stem.TaskContext, at: datetime, naive: datetime, day: date, clock: time,
              ident: UUID, amount: Decimal, color: Color, level: Level, order: Order,
              customer: Customer, maybe: datetime | None = None,
              old_style: Optional[UUID] = None,  # noqa: UP045 - the Optional spelling on purpose
              ids: list[UUID] | None = None, prices: dict[str, Decimal] | None = None,
              sizes: tuple[int, ...] = (), tagged: Annotated[UUID, "a note"] | None = None,
              count: int = 0, raw: dict[str, Any] | None = None) -> dict[str, str]:
    received = {k: repr(v) for k, v in locals().items() if k != "ctx"}
    received["pid"] = str(os.getpid())
    return received


def plain(ctx: stem.TaskContext, at, ident, amount=None):  # type: ignore[no-untyped-def]
    return {"at": repr(at), "ident": repr(ident), "amount": repr(amount)}


def strict(ctx: stem.TaskContext, ident: UUID, when: datetime | None = None) -> str:
    STRICT_CALLS.append(ctx.id)
    return str(ident)


def make_app(broker: str = "memory://arg-types", *, pool: bool = False) -> stem.Stem:
    """An app with every handler registered (explicit names, so pool children match);
    ``pool`` adds a task that runs in a process-pool child (its worker needs ``SPEC``)."""
    app = stem.Stem("arg-types", broker=broker, backend=broker)
    app.task(name="types.all")(all_types)
    if pool:
        app.task(name="types.all_in_child", isolation="process")(all_types)
    app.task(name="types.plain")(plain)
    app.task(name="types.strict", max_retries=3)(strict)
    return app


app = make_app(pool=True)
