"""A user's type checker sees Stem's types through the installed package (py.typed).

mypy runs, with this interpreter's environment, on a tiny project outside the
repository, so ``stem`` can only come from the installed (here: editable) package. A
package without ``py.typed``, or an editable install that only an import hook can
find, makes every Stem name ``Any`` there (or a missing import) and fails this test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_USER_MODULE = '''
from typing import Any

import stem

app = stem.Stem("shop", broker="memory://shop", backend="memory://shop")


@app.task
def charge(amount: int, rate: float) -> dict[str, Any]:
    return {"total": amount * rate}


async def use() -> None:
    total: dict[str, Any] = charge(1, 2.0)
    tid: str = await charge.enqueue(1, 2.0)
    result: stem.TaskResult[dict[str, Any]] = await charge.wait(tid)
    wrong: str = charge(1, 2.0)  # the one error expected
    del total, result, wrong
'''


def test_mypy_sees_the_installed_package_types(tmp_path: Path) -> None:
    (tmp_path / "user_tasks.py").write_text(_USER_MODULE)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--no-pretty",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "user_tasks.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert 'expression has type "dict[str, Any]", variable has type "str"' in errors[0]
