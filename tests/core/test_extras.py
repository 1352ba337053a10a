"""A missing optional dependency is named with the extra that brings it."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import sys
sys.modules[{module!r}] = None  # as if the extra were not installed
import stem
try:
    {action}
except stem.ConfigurationError as exc:
    print(type(exc).__name__, exc)
else:
    print("no error")
"""


@pytest.mark.parametrize(("module", "action", "extra"), [
    ("redis", "stem.Stem(broker='redis://127.0.0.1:6379/0').broker", "redis"),
    ("asyncpg", "stem.Stem(broker='postgresql://u@127.0.0.1/db').backend", "postgres"),
    ("cryptography", "stem.AesGcmPayloadEncoder({'k': bytes(32)})", "crypto"),
])
def test_missing_extra_names_it(module: str, action: str, extra: str) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, action=action)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingExtraError")
    assert f"pip install 'stem-tasks[{extra}]'" in out.stdout


def test_core_imports_without_any_extra() -> None:
    code = ("import sys\nfor m in ('redis', 'asyncpg', 'cryptography'):\n    sys.modules[m] = None\n"
            "import stem, stem.worker, stem_cli.main\n"
            "app = stem.Stem(broker='memory://x')\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
