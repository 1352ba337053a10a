"""The Stem app of the Django project, its task, and ``enqueue_on_commit``.

The worker imports this module (``stem worker start --app
examples.django_app.tasks:app``), so it sets Django up first: tasks use the ORM.
"""

from __future__ import annotations

import os
from typing import Any

import django
from django.conf import settings
from django.db import transaction

import stem

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
django.setup()

app = stem.Stem("django_demo", broker=settings.STEM_BROKER_URL)


def enqueue_on_commit(task: stem.TaskDefinition[..., Any], /, *, using: str | None = None,
                      **kwargs: Any) -> None:
    """Enqueue ``task(**kwargs)`` once the current transaction commits, and never if it
    rolls back: the worker never sees an order id that does not exist (yet).

    Outside a transaction (autocommit) it enqueues at once, as ``on_commit`` does.
    """
    transaction.on_commit(lambda: task.delay(**kwargs), using=using)


@app.task(name="orders.confirm")
def confirm_order(order_id: int) -> str:
    from examples.django_app.orders.models import Order

    updated = Order.objects.filter(pk=order_id).update(confirmed=True)
    if not updated:
        raise LookupError(f"no order {order_id}")
    return f"order {order_id} confirmed"
