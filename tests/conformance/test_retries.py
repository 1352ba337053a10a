"""Retries and failures on every adapter: retry filters, Reject, a task out of retries
in the dead letters with its reason, replayed by id and by filter, and its status
after the replay; dead-letter retention on the SQL stores."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import stem
from stem.adapters import store_from_url
from stem.adapters.sqlite._db import path_from_url, table_prefix
from stem.app import Stem
from stem.errors import ConfigurationError
from stem.status import TaskState
from tests.conformance.conftest import adapter_url
from tests.helpers import eventually, running_worker

NO_WAIT = stem.RetryPolicy(default_delay=0)


@pytest.fixture
async def app(store_url: str, namespace: str) -> AsyncIterator[Stem]:
    app = Stem("t", broker=store_url, namespace=namespace)
    try:
        yield app
    finally:
        await app.close()


async def _final(app: Stem, task_id: str) -> stem.TaskResult[Any]:
    async def done() -> stem.TaskResult[Any] | None:
        r = await app.get_result(task_id)
        return r if r is not None and r.state.is_terminal else None
    return await eventually(done, timeout=15)


async def _dead(app: Stem, n: int) -> list[stem.ports.DeadLetter]:
    async def check() -> list[stem.ports.DeadLetter] | None:
        letters = await app.broker.dead_letters("default")
        return letters if len(letters) == n else None
    return await eventually(check, timeout=15)


async def test_filters_reject_and_exhausted_retries_then_replay(app: Stem) -> None:
    healthy = {"yes": False}
    runs: dict[str, int] = {}

    @app.task(name="c.work", max_retries=1, retry_policy=NO_WAIT,
              autoretry_for=(OSError,), dont_autoretry_for=(FileNotFoundError,))
    async def work(kind: str, n: int) -> str:
        runs[f"{kind}{n}"] = runs.get(f"{kind}{n}", 0) + 1
        if kind == "reject":
            raise stem.Reject("bad order", dead_letter=n == 1)
        if kind == "missing":
            raise FileNotFoundError("no file")
        if not healthy["yes"]:
            raise ConnectionError(f"down {n}")
        return f"ok {n}"

    async with running_worker(app):
        io = [await work.enqueue("io", n) for n in range(3)]
        other = {k: await work.enqueue(k, 1) for k in ("reject", "missing")}
        silent = await work.enqueue("reject", 0)
        for tid in [*io, *other.values(), silent]:
            assert (await _final(app, tid)).state is TaskState.FAILED
        letters = await _dead(app, 4)
        assert runs == {"io0": 2, "io1": 2, "io2": 2, "reject1": 1, "missing1": 1,
                        "reject0": 1}
        reasons = {d.id: (d.reason, d.meta.get("error")) for d in letters}
        assert reasons == {**{t: ("max-retries-exhausted", f"ConnectionError: down {n}")
                              for n, t in enumerate(io)},
                           other["reject"]: ("bad order", None)}
        status = await app.get_result(io[0])
        assert status is not None and status.attempt == 1
        assert status.meta["deadLetterReason"] == "max-retries-exhausted: ConnectionError: down 0"

        healthy["yes"] = True
        # By id...
        assert await app.broker.replay_dead_letters("default", ids=[io[0]]) == 1
        assert (await eventually(lambda: _succeeded(app, io[0]), timeout=15)).value == "ok 0"
        # ...and by filter: the rest, the rejected one too, which is rejected again.
        first = min(d.dead_at for d in letters)
        assert await app.broker.replay_dead_letters("default", since=first, limit=5) == 3
        results = [await eventually(lambda t=t: _succeeded(app, t), timeout=15)
                   for t in io[1:]]
        assert [r.value for r in results] == ["ok 1", "ok 2"]
        assert all(r.attempt == 0 for r in results)
        [left] = await _dead(app, 1)
        assert left.id == other["reject"] and runs["reject1"] == 2
    stats = await app.broker.stats("default")
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 1)


async def _succeeded(app: Stem, task_id: str) -> stem.TaskResult[Any] | None:
    r = await app.get_result(task_id)
    return r if r is not None and r.state is TaskState.SUCCEEDED else None


@pytest.mark.parametrize("adapter", ["sqlite", "postgres"])
async def test_sql_stores_delete_dead_letters_past_their_retention(
        adapter: str, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base = adapter_url(adapter, namespace, tmp_path, request)
    url = f"{base}{'&' if '?' in base else '?'}dead_letter_retention=2d"
    store = store_from_url(url, namespace=namespace)
    try:
        broker: Any = store.broker
        await broker.publish([stem.Envelope(name="x", args={}, id=f"dl-{i}") for i in range(3)])
        for d in await broker.fetch(["default"], 3, block=1, consumer="t"):
            await broker.dead_letter([(d, "old" if d.envelope.id != "dl-2" else "new")])
        # Age two of them by three days, straight in the table.
        if adapter == "sqlite":
            table = f'"{table_prefix(namespace)}_dead_letters"'
            with sqlite3.connect(path_from_url(url)) as conn:
                conn.execute(f"UPDATE {table} SET dead_at = dead_at - 259200 "
                             "WHERE reason = 'old'")
        else:
            import asyncpg

            conn = await asyncpg.connect(request.getfixturevalue("postgres_url"))
            try:
                await conn.execute(
                    f'UPDATE "{namespace}".stem_dead_letters '
                    "SET dead_at = dead_at - interval '3 days' WHERE reason = 'old'")
            finally:
                await conn.close()
        assert await broker.sweep_dead_letters() == 2
        assert [d.id for d in await broker.dead_letters("default")] == ["dl-2"]
        assert await broker.sweep_dead_letters() == 0
    finally:
        await store.close()
    for bad in ("0", "-1d", "soon", ""):
        with pytest.raises(ConfigurationError, match="dead_letter_retention"):
            bad_url = f"{base}{'&' if '?' in base else '?'}dead_letter_retention={bad}"
            assert store_from_url(bad_url, namespace=namespace).broker is None
