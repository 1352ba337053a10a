"""`stem schedule` in process (``stem_cli.main.run``): list, show, apply (and its dry run),
enable, disable, delete and dry-run, as text and ``--json``, with their exit codes (0 ok,
1 not found, 2 bad usage or a bad spec) and one-line errors, on the file store and on
the Postgres and Redis schedule stores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from stem.adapters import store_from_url
from stem.beat import ScheduleRun
from stem.beat.file_store import FileScheduleStore
from stem.ports import ScheduleStore
from stem_cli.main import run
from tests.services import drop_pg_schema, drop_redis_keys

STORES = ["file", "postgres", "redis"]


class Cli:
    """``stem schedule ...`` against one schedule store, capturing its output."""

    def __init__(self, capsys: pytest.CaptureFixture[str], url: str, namespace: str) -> None:
        self.capsys, self.url, self.namespace = capsys, url, namespace

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = run(["schedule", *args, "--schedule-store", self.url])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self(*args, "--json")
        assert code == 0, err
        return orjson.loads(out)

    def schedules(self) -> ScheduleStore:
        if self.url.endswith(".json"):
            return FileScheduleStore(self.url)
        return store_from_url(self.url, namespace=self.namespace).schedules

    def record_run(self, entry_id: str, version: int) -> None:
        async def go() -> None:
            schedules = self.schedules()
            now = datetime.now(UTC)
            try:
                await schedules.mark_run(
                    ScheduleRun(entry_id, now - timedelta(seconds=1), now, False, 3, "E: x"),
                    expected_version=version, next_run_at=now + timedelta(hours=1))
            finally:
                await schedules.close()
        asyncio.run(go())


@pytest.fixture(params=STORES)
def cli(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], namespace: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    monkeypatch.setenv("STEM_NAMESPACE", namespace)  # the CLI's namespace for store URLs
    if request.param == "file":
        yield Cli(capsys, str(tmp_path / "schedules.json"), namespace)
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        yield Cli(capsys, url, namespace)
        asyncio.run(drop_pg_schema(url, namespace))
    else:
        url = request.getfixturevalue("redis_url")
        yield Cli(capsys, url, namespace)
        asyncio.run(drop_redis_keys(url, namespace))


def one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("stem: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def write(path: Path, document: Any) -> Path:
    path.write_bytes(orjson.dumps(document))
    return path


NIGHTLY = {"task": "reports.send", "schedule": "0 3 * * *", "timezone": "Europe/Paris",
           "args": {"to": "ops"}, "jitter": "5s", "queue": "reports"}
FAST = {"taskName": "reports.ping", "spec": "every:30s"}


def test_apply_with_dry_run_shows_the_diff_and_writes_nothing(cli: Cli, tmp_path: Path
                                                               ) -> None:
    plan = write(tmp_path / "plan.json", {"nightly": NIGHTLY, "fast": FAST})
    assert cli.json("apply", str(plan), "--dry-run") == {"dryRun": True, "entries": [
        {"action": "create", "id": "nightly", "changes": {}},
        {"action": "create", "id": "fast", "changes": {}}]}
    code, out, _ = cli("apply", str(plan), "--dry-run")
    assert code == 0 and out.splitlines() == ["nightly: would create", "fast: would create"]
    assert cli.json("list") == []

    code, out, _ = cli("apply", str(plan))
    assert code == 0 and out.splitlines() == ["nightly: create", "fast: create"]
    assert [e["id"] for e in cli.json("list")] == ["fast", "nightly"]

    changed = write(tmp_path / "plan.json", {"nightly": {**NIGHTLY, "schedule": "30 4 * * *"},
                                             "fast": FAST})
    diff = cli.json("apply", str(changed), "--dry-run")
    assert diff["entries"] == [
        {"action": "update", "id": "nightly", "changes": {"spec": {
            "from": {"kind": "cron", "expression": "0 3 * * *"},
            "to": {"kind": "cron", "expression": "30 4 * * *"}}}},
        {"action": "unchanged", "id": "fast", "changes": {}}]
    code, out, _ = cli("apply", str(changed), "--dry-run")
    assert code == 0 and out.splitlines() == [
        "nightly: would update",
        '  spec: {"kind":"cron","expression":"0 3 * * *"} -> '
        '{"kind":"cron","expression":"30 4 * * *"}',
        "fast: unchanged"]
    assert cli.json("show", "nightly")["spec"]["expression"] == "0 3 * * *"  # not written

    assert cli.json("apply", str(changed))["dryRun"] is False
    assert cli.json("show", "nightly")["spec"]["expression"] == "30 4 * * *"


def test_list_show_enable_disable_delete(cli: Cli, tmp_path: Path) -> None:
    assert cli("apply", str(write(tmp_path / "p.json", [{"name": "nightly", **NIGHTLY}])))[0] == 0
    [listed] = cli.json("list")
    assert (listed["id"], listed["taskName"], listed["queue"], listed["jitterMs"],
            listed["timezone"], listed["args"], listed["enabled"]) == (
        "nightly", "reports.send", "reports", 5000, "Europe/Paris", {"to": "ops"}, True)
    assert listed["nextRunAt"] is not None
    code, out, _ = cli("list")
    assert code == 0
    row = next(line for line in out.splitlines() if "nightly" in line)
    for cell in ("reports.send", "reports", "Europe/Paris", "5000ms", "yes"):
        assert cell in row, out

    shown = cli.json("show", "nightly")
    assert shown["id"] == "nightly" and shown["history"] == []
    cli.record_run("nightly", shown["version"])
    shown = cli.json("show", "nightly")
    assert [(r["success"], r["error"], r["durationMs"]) for r in shown["history"]] == [
        (False, "E: x", 3)]
    assert shown["totalRunCount"] == 1 and shown["lastError"] == "E: x"
    code, out, _ = cli("show", "nightly")
    assert code == 0 and "schedule nightly" in out and "failed: E: x" in out

    disabled = cli.json("disable", "nightly")
    assert disabled["enabled"] is False and disabled["version"] == shown["version"] + 1
    assert cli.json("show", "nightly")["enabled"] is False
    assert cli("disable", "nightly")[1] == "nightly: disabled\n"
    enabled = cli.json("enable", "nightly")
    assert enabled["enabled"] is True and enabled["nextRunAt"] is not None
    assert cli("enable", "nightly")[1] == "nightly: enabled\n"
    assert cli.json("show", "nightly")["totalRunCount"] == 1  # the bookkeeping is kept

    assert cli.json("delete", "nightly") == {"id": "nightly", "deleted": True}
    assert cli.json("list") == []
    assert cli("apply", str(tmp_path / "p.json"))[0] == 0
    assert cli("delete", "nightly", "--yes")[:2] == (0, "nightly: deleted\n")


@pytest.mark.parametrize("command", [["show", "ghost"], ["enable", "ghost"],
                                     ["disable", "ghost"], ["delete", "ghost", "--yes"],
                                     ["dry-run", "--id", "ghost"]])
def test_a_missing_entry_is_exit_1_with_one_line(cli: Cli, command: list[str]) -> None:
    code, out, err = cli(*command)
    assert code == 1 and out == ""
    one_error_line(err, "no schedule entry 'ghost'")
    code, out, err = cli(*command, "--json")
    assert code == 1 and out == ""
    one_error_line(err, "no schedule entry 'ghost'")


def test_dry_run_previews_fire_times(cli: Cli, tmp_path: Path) -> None:
    start = "2025-01-01T00:00:00Z"
    assert cli.json("dry-run", "--spec", "every:90s", "--count", "3", "--from", start) == [
        "2025-01-01T00:01:30+00:00", "2025-01-01T00:03:00+00:00", "2025-01-01T00:04:30+00:00"]
    # 02:30 Paris every day, across the spring-forward night (30 March 2025: 02:30 does
    # not exist and fires at 03:00 CEST).
    paris = cli.json("dry-run", "--spec", "30 2 * * *", "--tz", "Europe/Paris", "-n", "3",
                     "--from", "2025-03-28T12:00:00Z")
    assert paris == ["2025-03-29T02:30:00+01:00", "2025-03-30T03:00:00+02:00",
                     "2025-03-31T02:30:00+02:00"]
    code, out, _ = cli("dry-run", "--spec", '{"kind":"interval","everyMs":1000}', "-n", "2",
                       "--from", start)
    assert code == 0 and out.splitlines() == ["2025-01-01T00:00:01+00:00",
                                              "2025-01-01T00:00:02+00:00"]
    cli("apply", str(write(tmp_path / "p.json", {"nightly": NIGHTLY})))
    by_id = cli.json("dry-run", "--id", "nightly", "-n", "1", "--from", start)
    assert by_id == ["2025-01-01T03:00:00+01:00"]  # in the entry's own time zone


@pytest.mark.parametrize(("args", "needle"), [
    (["--spec", "61 * * * *"], "61"),
    (["--spec", "every:0s"], "every"),
    (["--spec", '{"kind":"lunar"}'], "lunar"),
    (["--spec", "* * * * *", "--tz", "Mars/Olympus"], "Mars/Olympus"),
    (["--spec", "* * * * *", "--count", "0"], "--count"),
    (["--spec", "* * * * *", "--from", "yesterday"], "--from"),
    ([], "--spec or --id"),
    (["--spec", "* * * * *", "--id", "x"], "--spec or --id"),
])
def test_dry_run_refuses_bad_input_with_exit_2(cli: Cli, args: list[str], needle: str) -> None:
    code, out, err = cli("dry-run", *args)
    assert code == 2 and out == ""
    one_error_line(err, needle)


def test_apply_refuses_a_bad_file_with_exit_2_and_writes_nothing(cli: Cli, tmp_path: Path
                                                                 ) -> None:
    cases = {
        "spec.json": (orjson.dumps({"ok": FAST, "bad": {"task": "t", "schedule": "99 * * * *"}}),
                      "'bad'"),
        "zone.json": (orjson.dumps({"z": {**FAST, "timezone": "Nowhere/City"}}), "Nowhere/City"),
        "task.json": (orjson.dumps([{"id": "nt", "spec": "every:1s"}]), "'task'"),
        "broken.json": (b"{not json", "cannot parse"),
        "twice.json": (orjson.dumps([{"id": "a", **FAST}, {"id": "a", **FAST}]), "twice"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_bytes(text)
        code, out, err = cli("apply", str(tmp_path / name))
        assert code == 2 and out == "", (name, out)
        one_error_line(err, name, needle)
    code, _, err = cli("apply", str(tmp_path / "missing.json"))
    assert code == 2
    one_error_line(err, "missing.json")
    assert cli.json("list") == []


def test_bad_usage_is_exit_2_with_one_line(cli: Cli) -> None:
    code, _, err = cli("list", "--no-such-option")
    assert code == 2
    one_error_line(err, "--no-such-option")
    code, _, err = cli("show")
    assert code == 2
    one_error_line(err, "Missing argument 'entry_id'")
