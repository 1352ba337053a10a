"""The `stem` command line: tasks ls, result, misconfiguration."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

import stem
from tests.e2e.conftest import ROOT


def run_stem(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stem_cli", *args], cwd=ROOT,
                          env={**os.environ, **(env or {}), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=60)


def test_tasks_ls_lists_registered_tasks() -> None:
    out = run_stem("tasks", "ls", "--app", "tests.e2e.e2e_app:app")
    assert out.returncode == 0, out.stderr
    for name in ("e2e.add", "e2e.flaky", "e2e.slow"):
        assert name in out.stdout
    assert "thread" in out.stdout and "inline" in out.stdout


def test_tasks_ls_shows_the_isolation_of_a_worker_with_the_same_pool_option() -> None:
    def isolation(out: str, name: str) -> str:
        line = next(x for x in out.splitlines() if name in x)
        return next(w for w in ("inline", "thread", "process") if w in line.split())

    plain = run_stem("tasks", "ls", "--app", "tests.e2e.e2e_app:app")
    pooled = run_stem("tasks", "ls", "--app", "tests.e2e.e2e_app:app", "--pool", "2")
    assert plain.returncode == 0 and pooled.returncode == 0, plain.stderr + pooled.stderr
    # e2e.flaky is a def handler: a thread, or the pool under --pool; async ones stay inline.
    assert (isolation(plain.stdout, "e2e.flaky"), isolation(pooled.stdout, "e2e.flaky")) == (
        "thread", "process")
    assert isolation(pooled.stdout, "e2e.add") == "inline"


async def test_result_shows_state_value_attempt_and_progress(
        sqlite_url: str, start_worker: Callable[..., subprocess.Popen[bytes]]) -> None:
    # The worker runs Stem("e2e"): its namespace is "e2e", and the producer says so.
    producer = stem.Stem("p", broker=sqlite_url, backend=sqlite_url, namespace="e2e")
    start_worker()
    tid = await producer.enqueue("e2e.add", x=2, y=40)
    await producer.wait(tid, timeout=20)
    await producer.close()
    env = {"STEM_BROKER_URL": sqlite_url, "STEM_NAMESPACE": "e2e"}
    out = run_stem("result", tid, env=env)
    assert out.returncode == 0, out.stderr
    assert "succeeded" in out.stdout and "42" in out.stdout
    raw = run_stem("result", tid, "--json", env=env)
    data = orjson.loads(raw.stdout)
    assert (data["id"], data["state"], data["payload"], data["attempt"]) == (tid, "succeeded", 42, 0)
    missing = run_stem("result", "no-such-id", env=env)
    assert missing.returncode == 1 and "no result for task no-such-id" in missing.stderr


def test_bad_broker_url_fails_fast_with_a_fix() -> None:
    out = run_stem("worker", "start", "--app", "tests.e2e.e2e_app:app",
                   env={"STEM_BROKER_URL": "amqp://localhost"})
    assert out.returncode != 0
    assert "unsupported scheme 'amqp'" in out.stderr
    assert out.stderr.count("\n") <= 2


def test_migrate_applies_postgres_migrations_once(postgres_url: str, namespace: str,
                                                  tmp_path: Path) -> None:
    import asyncio

    from tests.services import drop_pg_schema

    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}"
    try:
        first = run_stem("migrate", "--url", url)
        assert first.returncode == 0, first.stderr
        assert "applied migrations 1, 2, 3" in first.stdout
        again = run_stem("migrate", "--url", url)
        assert "none (already current)" in again.stdout
        other = run_stem("migrate", "--url", f"sqlite:///{tmp_path / 'x.db'}")
        assert "none (already current)" in other.stdout  # tables created, nothing versioned
        assert (tmp_path / "x.db").exists()
    finally:
        asyncio.run(drop_pg_schema(postgres_url, namespace))


def test_migrate_works_in_the_apps_namespace_or_the_one_named(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "ns.db"
    env = {"STEM_BROKER_URL": f"sqlite:///{db}", "STEM_RESULT_BACKEND_URL": "",
           "STEM_NAMESPACE": ""}

    def tables() -> set[str]:
        with sqlite3.connect(db) as conn:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}

    by_app = run_stem("migrate", "--app", "tests.e2e.e2e_app:app", env=env)
    assert by_app.returncode == 0, by_app.stderr
    assert "(namespace e2e)" in by_app.stdout  # Stem("e2e"): its name is its namespace
    assert "e2e_jobs" in tables() and "stem_jobs" not in tables()
    named = run_stem("migrate", "--namespace", "billing", env=env)
    assert "(namespace billing)" in named.stdout and "billing_jobs" in tables()
    plain = run_stem("migrate", env=env)
    assert "(namespace stem)" in plain.stdout and "stem_jobs" in tables()
    from_env = run_stem("migrate", env={**env, "STEM_NAMESPACE": "shipping"})
    assert "(namespace shipping)" in from_env.stdout and "shipping_jobs" in tables()
    both = run_stem("migrate", "-A", "tests.e2e.e2e_app:app", "--namespace", "x", env=env)
    assert both.returncode == 2 and "--app or --namespace" in both.stderr
    bad = run_stem("migrate", "--namespace", "Bad.NS", env=env)
    assert bad.returncode == 2 and "--namespace: namespace 'Bad.NS' is not allowed" in bad.stderr


def test_migrate_namespace_is_the_postgres_schema(postgres_url: str, namespace: str) -> None:
    import asyncio

    import asyncpg

    from tests.services import drop_pg_schema

    async def schemas() -> set[str]:
        conn = await asyncpg.connect(postgres_url)
        try:
            return {r[0] for r in await conn.fetch(
                "SELECT schema_name FROM information_schema.schemata")}
        finally:
            await conn.close()

    try:
        out = run_stem("migrate", "--url", postgres_url, "--namespace", namespace)
        assert out.returncode == 0, out.stderr
        assert f"(namespace {namespace}): applied migrations 1, 2, 3" in out.stdout
        assert namespace in asyncio.run(schemas())
    finally:
        asyncio.run(drop_pg_schema(postgres_url, namespace))


@pytest.mark.parametrize("url,says", [
    ("redis://127.0.0.1:1/0", "127.0.0.1:1"),
    ("postgresql://postgres@127.0.0.1:1/test", "127.0.0.1"),
])
def test_unreachable_server_fails_fast_saying_what_to_fix(url: str, says: str) -> None:
    started = time.monotonic()
    out = run_stem("worker", "start", "--app", "tests.e2e.e2e_app:app",
                   env={"STEM_BROKER_URL": url})
    assert time.monotonic() - started < 20
    assert out.returncode == 1
    assert says in out.stderr and "stem: error:" in out.stderr


async def test_dlq_list_replay_purge_and_observe_queues(sqlite_url: str) -> None:
    from stem.envelope import Envelope

    # Stem() (no name) and the CLI without --app or STEM_NAMESPACE share namespace "stem".
    app = stem.Stem(broker=sqlite_url, backend=sqlite_url)
    env = Envelope(name="e2e.add", args={"x": 1, "y": 2})
    await app.broker.publish([env])
    [d] = await app.broker.fetch(["default"], 1, block=1, consumer="t")
    await app.broker.dead_letter([(d, "unknown task 'e2e.add'")])
    await app.broker.publish_raw("default", b"\x00garbage")
    [bad] = await app.broker.fetch(["default"], 1, block=1, consumer="t")
    await app.broker.dead_letter([(bad, "undecodable envelope")])
    await app.close()
    cli_env = {"STEM_BROKER_URL": sqlite_url}

    listed = run_stem("dlq", "list", "--json", env=cli_env)
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert {(r["task"], r["reason"]) for r in rows} == {
        ("e2e.add", "unknown task 'e2e.add'"), (None, "undecodable envelope")}
    table = run_stem("dlq", "list", env=cli_env)
    assert "unknown task" in table.stdout and "(undecodable)" in table.stdout

    def queue_counts() -> dict[str, int]:
        out = run_stem("observe", "queues", "--json", env=cli_env)
        assert out.returncode == 0, out.stderr
        return orjson.loads(out.stdout.splitlines()[0])  # type: ignore[no-any-return]

    assert queue_counts() == {"queue": "default", "pending": 0, "delayed": 0, "inFlight": 0,
                              "dead": 2}
    replay = run_stem("dlq", "replay", "--yes", env=cli_env)
    assert "default: replayed 1" in replay.stdout  # the undecodable one stays
    assert (queue_counts()["pending"], queue_counts()["dead"]) == (1, 1)
    purge = run_stem("dlq", "purge", "--yes", env=cli_env)
    assert "default: purged 1" in purge.stdout
    assert queue_counts()["dead"] == 0


async def test_dlq_show_pages_and_replay_by_id_filter_dry_run_and_confirmation(
        sqlite_url: str) -> None:
    from stem.envelope import Envelope

    app = stem.Stem(broker=sqlite_url, backend=sqlite_url)  # namespace "stem", as the CLI's
    envs = [Envelope(name="e2e.add", args={"x": i, "y": 1}, attempt=2, max_retries=2)
            for i in range(3)]
    await app.broker.publish(envs)
    for d in await app.broker.fetch(["default"], 3, block=1, consumer="t"):
        await app.broker.dead_letter([(d, "max-retries-exhausted: RuntimeError: down")])
    cli_env = {"STEM_BROKER_URL": sqlite_url}

    shown = run_stem("dlq", "show", envs[1].id, env=cli_env)
    assert shown.returncode == 0, shown.stderr
    assert f"id:       {envs[1].id}" in shown.stdout
    assert "reason:   max-retries-exhausted\n" in shown.stdout
    assert "error:    RuntimeError: down" in shown.stdout
    assert '"x": 1' in shown.stdout and "attempt:  2 (max retries 2)" in shown.stdout
    missing = run_stem("dlq", "show", "nope", env=cli_env)
    assert missing.returncode == 1 and "no dead letter 'nope'" in missing.stderr

    page = run_stem("dlq", "list", "--json", "--offset", "1", "--limit", "1", env=cli_env)
    assert [orjson.loads(x)["id"] for x in page.stdout.splitlines()] == [envs[1].id]
    later = run_stem("dlq", "list", "--json", "--since", "2999-01-01T00:00:00", env=cli_env)
    assert later.returncode == 0 and later.stdout == ""
    bad = run_stem("dlq", "list", "--since", "yesterday", env=cli_env)
    assert bad.returncode == 2 and "is not an ISO-8601 time" in bad.stderr

    # No terminal to confirm on: refused, nothing changed.
    asked = run_stem("dlq", "replay", envs[0].id, env=cli_env)
    assert asked.returncode == 2 and "pass --yes" in asked.stderr
    dry = run_stem("dlq", "replay", "--dry-run", "--since", "2000-01-01", env=cli_env)
    assert dry.returncode == 0 and "would replay 3 (dry run" in dry.stdout
    assert (await app.broker.stats("default")).dead == 3

    by_id = run_stem("dlq", "replay", envs[0].id, "--delay", "5m", "-y", env=cli_env)
    assert by_id.returncode == 0, by_id.stderr
    assert "default: replayed 1" in by_id.stdout
    stats = await app.broker.stats("default")
    assert (stats.pending, stats.delayed, stats.dead) == (0, 1, 2)
    rest = run_stem("dlq", "replay", "--since", "2000-01-01T00:00:00Z", "--limit", "1",
                    "--yes", env=cli_env)
    assert "default: replayed 1" in rest.stdout
    stats = await app.broker.stats("default")
    assert (stats.pending, stats.delayed, stats.dead) == (1, 1, 1)
    [ready] = await app.broker.fetch(["default"], 1, block=1, consumer="t")
    assert ready.envelope is not None
    assert (ready.envelope.id, ready.envelope.attempt) == (envs[1].id, 0)
    bad_delay = run_stem("dlq", "replay", "--delay", "soon", "-y", env=cli_env)
    assert bad_delay.returncode == 2 and "is not a duration" in bad_delay.stderr
    await app.close()


def test_version_prints_the_package_version() -> None:
    out = run_stem("--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"stem {stem.__version__}\n", "")


def test_tasks_ls_piped_keeps_a_long_name_whole_and_json_uses_the_same_columns() -> None:
    from tests.e2e.ls_app import LONG_NAME

    # A narrow COLUMNS must not matter when stdout is a pipe.
    out = subprocess.run([sys.executable, "-m", "stem_cli", "tasks", "ls", "--app",
                          "tests.e2e.ls_app:app"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "40"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert LONG_NAME in out.stdout and "…" not in out.stdout
    header = next(line for line in out.stdout.splitlines() if "name" in line)
    columns = [c for c in header.replace("┃", " ").replace("│", " ").split()]
    row = next(line for line in out.stdout.splitlines() if LONG_NAME in line)
    cells = [c for c in row.replace("│", " ").split()]

    raw = run_stem("tasks", "ls", "--app", "tests.e2e.ls_app:app", "--json")
    assert raw.returncode == 0, raw.stderr
    data = orjson.loads(raw.stdout)
    assert isinstance(data, list) and [d["name"] for d in data] == sorted([LONG_NAME, "ls.short"])
    assert all(list(d) == columns for d in data)
    long = next(d for d in data if d["name"] == LONG_NAME)
    assert long == {"name": LONG_NAME, "queue": "billing", "max_retries": 2, "priority": 5,
                    "isolation": "inline", "handler": "tests.e2e.ls_app.reconcile"}
    assert cells == [str(long[c]) for c in columns]
    pooled = orjson.loads(run_stem("tasks", "ls", "--app", "tests.e2e.ls_app:app", "--json",
                                   "--pool", "2").stdout)
    assert next(d for d in pooled if d["name"] == "ls.short")["isolation"] == "process"


async def test_group_show_prints_a_chord_and_its_members(sqlite_url: str) -> None:
    app = stem.Stem("cli-group", broker=sqlite_url)

    @app.task(name="cli.add")
    async def add(x: int, y: int) -> int:
        return x + y

    from stem.groups import GroupMember
    from stem.status import TaskState

    result = await stem.chord([add.s(1, 1), add.s(2, 2)], add.s(10)).enqueue(chord_id="chord-1")
    groups = app.backend_store.groups  # type: ignore[union-attr]
    await groups.add_result("chord-1", GroupMember(0, result.task_ids[0], TaskState.SUCCEEDED, 2))
    await app.close()
    env = {"STEM_BROKER_URL": sqlite_url, "STEM_NAMESPACE": "cli-group"}
    out = run_stem("group", "show", "chord-1", env=env)
    assert out.returncode == 0, out.stderr
    assert "chord chord-1" in out.stdout and "running" in out.stdout
    assert "1 of 2 finished" in out.stdout and result.task_ids[0] in out.stdout
    assert result.callback_id in out.stdout and "not dispatched" in out.stdout
    as_json = run_stem("group", "show", "chord-1", "--json", env=env)
    data = orjson.loads(as_json.stdout)
    assert data["kind"] == "chord" and data["completed"] == 1 and data["expected"] == 2
    assert data["members"][0]["result"] == 2
    missing = run_stem("group", "show", "nope", env=env)
    assert missing.returncode == 1 and "no group nope" in missing.stderr


@pytest.mark.parametrize(("args", "threshold"), [((), 10_000), (("--gc-threshold", "0"), 700),
                                                  (("--gc-threshold", "50000"), 50_000)])
async def test_worker_start_tunes_the_garbage_collector_of_its_process(
        sqlite_url: str, start_worker: Callable[..., subprocess.Popen[bytes]],
        args: tuple[str, ...], threshold: int) -> None:
    producer = stem.Stem("p", broker=sqlite_url, backend=sqlite_url, namespace="e2e")
    start_worker(*args)
    tid = await producer.enqueue("e2e.gc")
    got = (await producer.wait(tid, timeout=20)).value
    await producer.close()
    assert got[0] == threshold
    # Start-up objects are frozen out of the collector's passes, unless tuning is off.
    assert (got[1] > 0) == (threshold != 700)


def test_worker_start_refuses_a_gc_threshold_out_of_range() -> None:
    out = run_stem("worker", "start", "--app", "tests.e2e.e2e_app:app", "--gc-threshold", "-1")
    assert out.returncode == 2 and "--gc-threshold" in out.stderr
