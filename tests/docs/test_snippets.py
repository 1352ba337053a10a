"""Every snippet in README.md and docs/*.md runs, so the docs cannot drift from the code.

One process per document, started in an empty temporary directory (so the default
SQLite store lands there), runs the document's blocks in order:

- a ```python block runs in one namespace shared by the document's blocks; top-level
  ``await`` is allowed;
- a ```python block whose first line is a comment naming a ``.py`` path
  (``# shop/tasks.py``) is written to that path instead (importable from the next blocks);
- in a ```bash block, a line ``stem worker start ...`` starts that worker in the
  background (stopped when the document ends); other shell lines are not run;
- ```python no-run marks the rare block that cannot run here (say why next to it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```", re.M | re.S)

_RUNNER = r'''
import ast, asyncio, os, shlex, signal, subprocess, sys, types
blocks = __import__("json").loads(sys.stdin.read())
sys.path.insert(0, os.getcwd())
ns = {"__name__": "__main__"}
loop = None
workers = []
try:
    for kind, line, code in blocks:
        if kind == "bash":
            for cmd in code.splitlines():
                if cmd.strip().startswith("stem worker start"):
                    argv = shlex.split(cmd.split("#")[0])
                    exe = os.path.join(os.path.dirname(sys.executable), "stem")
                    workers.append(subprocess.Popen([exe, *argv[1:]], env={**os.environ,
                        "PYTHONPATH": os.getcwd()}, start_new_session=True))
            continue
        compiled = compile(code, f"<snippet at line {line}>", "exec",
                           flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(compiled, ns)
        if asyncio.iscoroutine(result):
            if loop is None:
                loop = asyncio.new_event_loop()
            loop.run_until_complete(result)
finally:
    for w in workers:
        os.killpg(w.pid, signal.SIGTERM)
    for w in workers:
        try:
            w.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
'''


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    text = path.read_text()
    out: list[tuple[str, int, str]] = []
    for m in _FENCE.finditer(text):
        lang, info, body = m.group(1), m.group(2), m.group(3)
        line = text.count("\n", 0, m.start()) + 2
        if lang == "python" and "no-run" not in info:
            first = body.splitlines()[0] if body.strip() else ""
            target = re.fullmatch(r"#\s*([\w./-]+\.py)\s*", first)
            if target:
                out.append(("file", line, target.group(1) + "\n" + body))
            else:
                out.append(("python", line, body))
        elif lang == "bash":
            out.append(("bash", line, body))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_snippets_run(doc: Path, tmp_path: Path) -> None:
    import json

    blocks = []
    for kind, line, body in _blocks(doc):
        if kind == "file":
            rel, _, content = body.partition("\n")
            target = tmp_path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            continue
        blocks.append((kind, line, body))
    if not any(k == "python" for k, _, _ in blocks):
        return  # nothing executable in this document
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks),
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 0, f"{doc.name} snippets failed:\n{proc.stderr[-4000:]}"
