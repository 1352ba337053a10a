"""The file schedule store: the shared ScheduleStore suite on a JSON and a YAML file, the
Dart Stem's file forms and aliases, every field through the file, and two real
processes writing one file at once."""

from __future__ import annotations

import asyncio
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from stem.beat import MarkRun, ScheduleEntry, ScheduleRun
from stem.beat.file_store import FILE_HISTORY_MAX, FileScheduleStore, entries_from_document
from stem.errors import ConfigurationError, ScheduleConflictError
from stem.testing.conformance import ScheduleStoreConformance

T0 = datetime(2024, 5, 6, 7, 8, 9, 123_000, tzinfo=UTC)


class TestFileStoreConformance(ScheduleStoreConformance):
    """The shared suite on a JSON file."""

    # A file is rewritten whole on every run, so it keeps 50 runs per entry, not 1000.
    expected_history_max = FILE_HISTORY_MAX

    @pytest.fixture
    def schedule_store_factory(self, tmp_path: Path) -> Any:
        return lambda: FileScheduleStore(tmp_path / "schedules.json")


class TestYamlFileStoreConformance(TestFileStoreConformance):
    """The shared suite on a YAML file."""

    @pytest.fixture
    def schedule_store_factory(self, tmp_path: Path) -> Any:
        return lambda: FileScheduleStore(tmp_path / "schedules.yaml")


def full_entry() -> ScheduleEntry:
    """An entry with every field set (and keys only the Dart Stem knows)."""
    return ScheduleEntry(
        id="full", task="reports.send",
        spec={"kind": "calendar", "weekdays": [1, 5], "hours": [9], "minutes": [0, 30]},
        args={"to": "ops", "n": [1, 2.5, None]}, kwargs={"flag": True}, queue="reports",
        enabled=False, jitter_ms=250, timezone="Europe/Paris",
        expire_at=T0 + timedelta(days=30), meta={"owner": "ops"},
        next_run_at=T0 + timedelta(minutes=1), last_run_at=T0 - timedelta(minutes=1),
        last_jitter_ms=12, last_error="ValueError: boom", last_success_at=T0 - timedelta(hours=1),
        last_error_at=T0 - timedelta(minutes=1), total_run_count=42, drift_ms=-3,
        created_at=T0 - timedelta(days=1), extra={"dartOnly": {"k": [1, "two"]}})


@pytest.mark.parametrize("name", ["s.json", "s.yaml", "s.yml"])
async def test_every_field_round_trips_through_the_file(tmp_path: Path, name: str) -> None:
    store = FileScheduleStore(tmp_path / name)
    stored = await store.upsert(full_entry())
    run = ScheduleRun("full", T0, T0 + timedelta(milliseconds=40), False, 7, "E: x")
    marked = await store.mark_run(run, expected_version=1, next_run_at=T0 + timedelta(hours=1),
                                  jitter_ms=9)
    assert marked is not None
    # A new store object reads only the file.
    again = FileScheduleStore(tmp_path / name)
    assert await again.get("full") == marked
    assert await again.history("full") == [run]
    assert marked.to_dict() == {**stored.to_dict(), **{
        "lastRunAt": "2024-05-06T07:08:09.163Z", "nextRunAt": "2024-05-06T08:08:09.123Z",
        "lastErrorAt": "2024-05-06T07:08:09.163Z", "lastError": "E: x", "lastJitterMs": 9,
        "driftMs": 40,
        "totalRunCount": 43, "version": 2, "updatedAt": marked.to_dict()["updatedAt"]}}
    text = (tmp_path / name).read_text()
    document = yaml.safe_load(text) if name.endswith((".yaml", ".yml")) else orjson.loads(text)
    [raw] = document["schedules"]
    # Dart keys as written, unknown ones kept at the top level.
    assert (raw["taskName"], raw["jitterMs"], raw["dartOnly"]) == (
        "reports.send", 250, {"k": [1, "two"]})
    assert document["history"]["full"][0]["error"] == "E: x"


async def test_an_entry_whose_spec_no_longer_parses_does_not_break_the_file(
        tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(orjson.dumps({"schedules": [
        {"id": "ok", "taskName": "t", "spec": {"kind": "interval", "everyMs": 1000}},
        {"id": "bad", "taskName": "t", "spec": {"kind": "cron", "expression": "99 * * * *"},
         "timezone": "Gone/Zone"},
    ]}))
    store = FileScheduleStore(path)
    assert [e.id for e in await store.entries()] == ["bad", "ok"]  # the beat reports "bad"
    bad = await store.get("bad")
    assert bad is not None and bad.spec["expression"] == "99 * * * *"
    with pytest.raises(ConfigurationError, match="'bad'"):  # `stem schedule apply` refuses it
        entries_from_document(orjson.loads(path.read_bytes()))


DART_FORMS = {
    "list": [
        {"id": "a", "taskName": "t.a", "spec": {"kind": "interval", "everyMs": 30000}},
        {"name": "b", "task": "t.b", "schedule": "*/5 * * * *", "jitter": "5s"},
    ],
    "schedules": {"schedules": [
        {"id": "a", "taskName": "t.a", "spec": "every:30s"},
        {"name": "b", "taskName": "t.b", "schedule": {"kind": "cron",
                                                       "expression": "*/5 * * * *"},
         "jitterMs": 5000},
    ]},
    "map": {
        "a": {"task": "t.a", "schedule": "every:30s"},
        "b": {"taskName": "t.b", "spec": "*/5 * * * *", "jitter": "5000ms"},
    },
}


@pytest.mark.parametrize("form", sorted(DART_FORMS))
async def test_the_dart_file_forms_and_aliases_are_read(tmp_path: Path, form: str) -> None:
    path = tmp_path / "dart.json"
    path.write_bytes(orjson.dumps(DART_FORMS[form]))
    store = FileScheduleStore(path)
    a, b = await store.entries()
    assert (a.id, a.task, a.spec) == ("a", "t.a", {"kind": "interval", "everyMs": 30000})
    assert (b.id, b.task, b.spec, b.jitter_ms) == (
        "b", "t.b", {"kind": "cron", "expression": "*/5 * * * *"}, 5000)
    # The first write turns the file into the canonical form, keeping everything.
    await store.upsert(a.copy(queue="q"), expected_version=a.version)
    document = orjson.loads(path.read_bytes())
    assert [e["id"] for e in document["schedules"]] == ["a", "b"]
    assert (await store.get("b")) == b


def test_a_yaml_file_in_the_documented_form(tmp_path: Path) -> None:
    document = yaml.safe_load("""
nightly:
  task: reports.send
  schedule: "0 3 * * *"
  timezone: Europe/Paris
  args: {to: ops}
  jitter: 5s
  queue: reports
  expireAt: 2030-01-01T00:00:00Z
once:
  taskName: reports.once
  spec: {kind: clocked, runAt: "2030-01-01T09:00:00Z"}
  options: {runOnce: false}
""")
    nightly, once = entries_from_document(document)
    assert (nightly.id, nightly.task, nightly.spec, nightly.timezone, nightly.args,
            nightly.jitter_ms, nightly.queue, nightly.expire_at) == (
        "nightly", "reports.send", {"kind": "cron", "expression": "0 3 * * *"},
        "Europe/Paris", {"to": "ops"}, 5000, "reports", datetime(2030, 1, 1, tzinfo=UTC))
    assert once.spec["runOnce"] is False


@pytest.mark.parametrize(("document", "needle"), [
    ({"a": {"task": "t"}}, "lacks 'spec'"),
    ({"a": {"spec": "every:1s"}}, "lacks 'task'"),
    ([{"task": "t", "spec": "every:1s"}], "lacks 'id'"),
    ({"a": {"task": "t", "spec": "every:1s", "jitter": "soon"}}, "jitter"),
    ({"a": {"task": "t", "spec": "every:1s", "args": [1]}}, "'args' must be a dict"),
    ("text", "expected a list"),
])
def test_bad_documents_are_refused_naming_the_entry(document: Any, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle) as info:
        entries_from_document(document, source="plan.json")
    assert str(info.value).startswith("plan.json")


async def test_mark_runs_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileScheduleStore(tmp_path / "s.json")
    for n in range(3):
        await store.upsert(ScheduleEntry(id=f"e{n}", task="t", spec={"kind": "interval",
                                                                    "everyMs": 1000}))
    writes = []
    real = store._write
    monkeypatch.setattr(store, "_write", lambda *a: (writes.append(1), real(*a)))
    runs = [MarkRun(ScheduleRun(f"e{n}", T0, T0, True), 1, T0 + timedelta(seconds=1))
            for n in range(3)]
    assert all(m is not None for m in await store.mark_runs(runs))
    assert len(writes) == 1


# -- two processes ----------------------------------------------------------------------

ROUNDS = 25


def _writer(path: str, tag: str, start: Any) -> None:
    """Own entries plus optimistic increments of one shared counter entry."""

    async def main() -> None:
        store = FileScheduleStore(path)
        start.wait(30)
        for n in range(ROUNDS):
            await store.upsert(ScheduleEntry(id=f"{tag}{n:03d}", task="t",
                                             spec={"kind": "interval", "everyMs": 1000}))
            while True:
                counter = await store.get("counter")
                assert counter is not None
                try:
                    await store.upsert(counter.copy(meta={"n": counter.meta["n"] + 1}),
                                       expected_version=counter.version)
                    break
                except ScheduleConflictError:
                    continue
    asyncio.run(main())


@pytest.mark.parametrize("name", ["s.json", "s.yaml"])
def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    store = FileScheduleStore(path)
    asyncio.run(store.upsert(ScheduleEntry(
        id="counter", task="t", spec={"kind": "interval", "everyMs": 1000}, meta={"n": 0})))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(path), tag, start)) for tag in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = {e.id: e for e in asyncio.run(store.entries())}
    assert len(entries) == 1 + 2 * ROUNDS
    counter = entries["counter"]
    assert counter.meta["n"] == 2 * ROUNDS  # every increment landed, none overwritten
    assert counter.version == 1 + 2 * ROUNDS
    assert not list(tmp_path.glob(f"{name}.*.tmp"))  # no temporary file left behind
