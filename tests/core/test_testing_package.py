"""stem.testing imports without pytest; the conformance suite names its test dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CODE = """
import sys
sys.modules["pytest"] = None  # as if not installed
sys.modules["pytest_asyncio"] = None
import stem
assert "stem.testing" not in sys.modules, "import stem imported stem.testing"
import stem.testing
try:
    import stem.testing.conformance
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("stem.testing.conformance imported without pytest")
"""


def test_stem_and_stem_testing_import_without_pytest() -> None:
    out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install pytest pytest-asyncio" in out.stdout
