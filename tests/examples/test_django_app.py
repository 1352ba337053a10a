"""examples/django_app: ``enqueue_on_commit`` publishes after COMMIT and never after a
rollback; the view's order is confirmed by a real worker process (Django runs in
subprocesses: its settings are process-wide)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson

from tests.e2e.conftest import ROOT
from tests.helpers import WorkerProcesses, wait_until

SCRIPT = r"""
import asyncio, json, os
os.environ["DJANGO_SETTINGS_MODULE"] = "examples.django_app.settings"
import django
django.setup()
from django.core.management import call_command
from django.db import transaction
from django.test import Client
from examples.django_app.orders.models import Order
from examples.django_app.tasks import app, confirm_order, enqueue_on_commit

call_command("migrate", verbosity=0)

def pending():
    async def go():
        try:
            return (await app.broker.stats("default")).pending
        finally:
            await app.close()
    return asyncio.run(go())

seen = {}
with transaction.atomic():
    order = Order.objects.create(item="book")
    enqueue_on_commit(confirm_order, order_id=order.pk)
    seen["inside"] = pending()
seen["after_commit"] = pending()
try:
    with transaction.atomic():
        ghost = Order.objects.create(item="ghost")
        enqueue_on_commit(confirm_order, order_id=ghost.pk)
        raise RuntimeError("roll back")
except RuntimeError:
    pass
seen["after_rollback"] = pending()
response = Client().post("/orders/", data=json.dumps({"item": "lamp"}),
                         content_type="application/json")
seen["status"] = response.status_code
seen["posted"] = response.json()["id"]
seen["after_post"] = pending()
seen["bad"] = Client().post("/orders/", data="{}", content_type="application/json").status_code
print(json.dumps(seen))
"""


def test_enqueue_on_commit_and_a_worker_confirms_the_order(tmp_path: Path) -> None:
    env = {"STEM_BROKER_URL": f"sqlite:///{tmp_path / 'stem.db'}",
           "STEM_RESULT_BACKEND_URL": "", "DJANGO_DB": str(tmp_path / "orders.sqlite3")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = orjson.loads(out.stdout.splitlines()[-1])
    assert (seen["inside"], seen["after_commit"], seen["after_rollback"],
            seen["after_post"]) == (0, 1, 1, 2)
    assert (seen["status"], seen["bad"]) == (201, 400)

    workers = WorkerProcesses(tmp_path)
    workers.start("examples.django_app.tasks:app", env=env)
    try:
        def confirmed() -> bool:
            with sqlite3.connect(env["DJANGO_DB"]) as db:
                rows = db.execute("SELECT item FROM orders_order WHERE confirmed").fetchall()
            return sorted(r[0] for r in rows) == ["book", "lamp"]

        wait_until(confirmed, timeout=30)
    finally:
        workers.kill_all()
