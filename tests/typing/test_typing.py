"""Run mypy (the project's --strict config) on the typing sample files.

``pass_*.py`` must type-check cleanly. In ``fail_*.py`` every line marked
``# E: <message>`` must produce a mypy error containing that message, and no
unmarked line may produce one — so a regression that makes the typed API accept
wrong arguments or results (e.g. typing ``enqueue`` as ``*args: Any``) fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PASS_FILES = sorted(HERE.glob("pass_*.py"))
FAIL_FILES = sorted(HERE.glob("fail_*.py"))
_ERROR_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<msg>.*?)(?:  \[[a-z-]+\])?$")
_MARKER = re.compile(r"#\s*E:\s*(?P<msg>.+?)\s*$")


@pytest.fixture(scope="module")
def mypy_errors() -> dict[str, dict[int, list[str]]]:
    """One mypy run over every sample file: errors by file name, then by line."""
    files = [str(p.relative_to(ROOT)) for p in PASS_FILES + FAIL_FILES]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml",
         "--no-error-summary", "--show-error-codes", "--no-pretty", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    if proc.returncode not in (0, 1) or proc.stderr.strip():
        pytest.fail(f"mypy did not run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}")
    errors: dict[str, dict[int, list[str]]] = {}
    for line in proc.stdout.splitlines():
        m = _ERROR_LINE.match(line)
        if m:
            name = Path(m["path"]).name
            errors.setdefault(name, {}).setdefault(int(m["line"]), []).append(m["msg"])
    return errors


def test_there_are_samples_of_both_kinds() -> None:
    assert PASS_FILES and len(FAIL_FILES) >= 2


@pytest.mark.parametrize("path", PASS_FILES, ids=lambda p: p.name)
def test_pass_files_type_check(path: Path, mypy_errors: dict[str, dict[int, list[str]]]) -> None:
    assert mypy_errors.get(path.name, {}) == {}


@pytest.mark.parametrize("path", FAIL_FILES, ids=lambda p: p.name)
def test_fail_files_report_exactly_the_marked_errors(
    path: Path, mypy_errors: dict[str, dict[int, list[str]]]
) -> None:
    expected = {
        n: m["msg"]
        for n, text in enumerate(path.read_text().splitlines(), start=1)
        if (m := _MARKER.search(text))
    }
    assert expected, f"{path.name} has no '# E:' markers"
    got = mypy_errors.get(path.name, {})
    missing = {n: msg for n, msg in expected.items() if not any(msg in e for e in got.get(n, []))}
    unexpected = {n: msgs for n, msgs in got.items() if n not in expected}
    assert not missing, f"expected mypy errors not reported: {missing}"
    assert not unexpected, f"mypy errors on unmarked lines: {unexpected}"
