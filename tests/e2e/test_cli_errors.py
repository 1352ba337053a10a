"""The real `stem` CLI on bad input: one line on stderr, the right exit code, no secrets.

Every command turns a StemError into one ``stem: error:`` line (exit 2 for configuration,
1 at run time), an out-of-range option into one usage line (exit 2), and never prints
a password that was in a URL.
"""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit, urlunsplit

import pytest

import stem
from tests.e2e.test_cli import run_stem
from tests.services import drop_pg_schema

PW = "Hunter2-s3cret"
APP = ["-A", "tests.e2e.e2e_app:app"]

COMMANDS = [
    ["result", "0190a5f2-0000-7000-8000-000000000000"],
    ["observe", "queues"],
    ["dlq", "list"],
    ["dlq", "replay"],
    ["dlq", "purge", "--yes"],
    ["migrate"],
    ["tasks", "ls", *APP],
    ["worker", "start", *APP],
]


def assert_one_clean_line(out: subprocess.CompletedProcess[str], code: int) -> str:
    """Exit ``code``, exactly one stderr line, no traceback, no password anywhere."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("stem: error: ")
    for secret in (PW, "s3cret", "Hunter2"):
        assert secret not in out.stdout + out.stderr
    return lines[0]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_unknown_scheme_with_a_password_is_one_masked_line_exit_2(args: list[str]) -> None:
    out = run_stem(*args, env={"STEM_BROKER_URL": f"amqp://guest:{PW}@broker.example:5672//"})
    line = assert_one_clean_line(out, 2)
    assert "unsupported scheme 'amqp'" in line
    assert "amqp://guest:***@broker.example:5672//" in line


def test_migrate_url_option_is_checked_and_masked() -> None:
    line = assert_one_clean_line(run_stem("migrate", "--url", f"mysql://root:{PW}@db/x"), 2)
    assert "--url" in line and "unsupported scheme 'mysql'" in line


def test_repr_of_an_app_masks_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    app = stem.Stem("svc", broker=f"redis://:{PW}@cache.example:6379/0")
    assert repr(app) == "<Stem 'svc' broker='redis://:***@cache.example:6379/0' tasks=0>"
    monkeypatch.setenv("STEM_BROKER_URL", f"postgresql://app:{PW}@db.example/app?sslpassword={PW}")
    shown = repr(stem.Stem.from_env("env"))
    assert PW not in shown and "postgresql://app:***@db.example/app?sslpassword=***" in shown


WORKER, DLQ = ["worker", "start", *APP], ["dlq", "list"]
UNREACHABLE = [
    (WORKER, f"redis://:{PW}@127.0.0.1:1/0"),
    (DLQ, f"redis://:{PW}@127.0.0.1:1/0"),
    (WORKER, f"rediss://default:{PW}@127.0.0.1:1/0"),
    # (sentinels take a while to give up: one command only)
    (DLQ, f"redis+sentinel://:{PW}@127.0.0.1:1,127.0.0.1:2/mymaster/0?sentinel_password={PW}"),
    (WORKER, f"postgresql://app:{PW}@127.0.0.1:1/app"),
    (DLQ, f"postgresql://app:{PW}@127.0.0.1:1/app"),
    (DLQ, f"postgresql://app@127.0.0.1:1/app?password={PW}"),
]


@pytest.mark.parametrize("args,url", UNREACHABLE,
                         ids=[f"{a[0]}-{u.split(':', 1)[0]}" for a, u in UNREACHABLE])
def test_unreachable_server_message_has_no_password(args: list[str], url: str) -> None:
    line = assert_one_clean_line(run_stem(*args, env={"STEM_BROKER_URL": url}), 1)
    assert "127.0.0.1" in line


@pytest.mark.parametrize("url", [
    f"redis://:Hunter2/{PW}@127.0.0.1:1/0",    # unescaped "/" in the password
    f"redis://u:Hunter2?{PW}@127.0.0.1:1/0",   # unescaped "?"
    f"postgresql://u:Hunter2/{PW}@127.0.0.1:1/app",
    f"postgresql://u:Hunter2@{PW}/x@127.0.0.1:1/app",
    f"postgresql://u:{PW}@127.0.0.1:x/app",
    f"sqlite://u:{PW}@host/stem.db",
], ids=["redis-slash", "redis-question", "pg-slash", "pg-at", "pg-port", "sqlite-host"])
def test_malformed_url_is_a_configuration_error_without_the_password(url: str) -> None:
    line = assert_one_clean_line(run_stem("dlq", "list", env={"STEM_BROKER_URL": url}), 2)
    assert "***" in line


def test_rejected_login_on_a_real_redis_is_not_echoed(redis_url: str) -> None:
    # (The default user takes any password when none is set: log in as a user that
    # does not exist, so the server refuses.)
    parts = urlsplit(redis_url)
    with_pw = urlunsplit(parts._replace(netloc=f"nobody:{PW}@{parts.hostname}:{parts.port}"))
    line = assert_one_clean_line(run_stem("dlq", "list", env={"STEM_BROKER_URL": with_pw}), 1)
    assert "nobody:***@" in line and "password" in line


BAD_OPTIONS = [
    (["worker", "start", *APP, "--block-time", "-5"], ["'--block-time'", "0.01..3600"]),
    (["worker", "start", *APP, "--block-time", "0"], ["'--block-time'", "0.01..3600"]),
    (["worker", "start", *APP, "--grace", "-1"], ["'--grace'", "0..86400"]),
    (["worker", "start", *APP, "--grace", "nan"], ["'--grace'", "0..86400"]),
    (["worker", "start", *APP, "--log-level", "NOPE"], ["'--log-level'", "DEBUG, INFO"]),
    (["worker", "start", *APP, "--concurrency", "0"], ["'--concurrency'", "1..10000"]),
    (["worker", "start", *APP, "-c", "10001"], ["'--concurrency'", "1..10000"]),
    (["worker", "start", *APP, "--prefetch-multiplier", "0"], ["'--prefetch-multiplier'", "1..1000"]),
    (["worker", "start", *APP, "--pool", "0"], ["'--pool'", "1..1024"]),
    (["worker", "start", *APP, "--max-tasks-per-child", "0"], ["'--max-tasks-per-child'"]),
    (["worker", "start", *APP, "--max-memory-per-child", "-1"], ["'--max-memory-per-child'"]),
    (["worker", "start", *APP, "--concurrency", "many"], ["'--concurrency'"]),
    (["dlq", "list", "--limit", "0"], ["'--limit'", "1..1000000"]),
    (["dlq", "replay", "--limit", str(2**64)], ["'--limit'", "1..1000000"]),
    (["worker", "start", "--bogus"], ["--bogus"]),
]


@pytest.mark.parametrize("args,names", BAD_OPTIONS,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_usage_errors(args: list[str], names: list[str]) -> None:
    out = run_stem(*args, env={"STEM_BROKER_URL": "memory://"})
    line = assert_one_clean_line(out, 2)
    for name in names:
        assert name in line, line


def test_valid_log_level_in_any_case_is_accepted() -> None:
    # Parsing passes (lower-case level); the run then stops at the bad broker URL.
    out = run_stem("worker", "start", *APP, "--log-level", "debug", "--block-time", "0.5",
                   "--grace", "0", env={"STEM_BROKER_URL": f"amqp://:{PW}@h/"})
    line = assert_one_clean_line(out, 2)
    assert "unsupported scheme" in line


async def test_an_error_stem_does_not_wrap_is_one_line_too(postgres_url: str,
                                                            namespace: str) -> None:
    """A driver's error Stem has no wrapper for (here: a table altered behind Stem's back)
    is one masked ``stem: error:`` line naming its type, exit 1; ``STEM_TRACEBACK=1``
    adds the traceback before that line."""
    import asyncpg

    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={namespace}"
    env = {"STEM_BROKER_URL": url}
    try:
        assert run_stem("migrate", env=env).returncode == 0
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'ALTER TABLE "{namespace}".stem_dead_letters DROP COLUMN reason')
        finally:
            await conn.close()
        line = assert_one_clean_line(run_stem("dlq", "list", env=env), 1)
        assert line == 'stem: error: UndefinedColumnError: column "reason" does not exist'
        out = run_stem("dlq", "list", env={**env, "STEM_TRACEBACK": "1"})
        assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
        assert out.stderr.strip().splitlines()[-1] == line
    finally:
        await drop_pg_schema(postgres_url, namespace)
