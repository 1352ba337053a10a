"""One event-name style in the library: ``log.<level>("subject.event", field=...)`` (and
``emit(logger, level, "subject.event", ...)`` on hot paths)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

STEM = Path(__file__).resolve().parents[2] / "stem"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
#: Dotted, lower case, subject first: ``worker.started``, ``redis.broker.reconnected``.
EVENT = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


def _log_calls() -> list[tuple[str, int, ast.expr | None]]:
    calls = []
    for path in sorted(STEM.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(STEM.parent)}"
            if (isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"):
                calls.append((where, node.lineno, node.args[0] if node.args else None))
            elif isinstance(node.func, ast.Name) and node.func.id == "emit":  # stem.log.emit
                calls.append((where, node.lineno, node.args[2] if len(node.args) > 2 else None))
    return calls


def test_every_library_log_call_names_a_dotted_event() -> None:
    calls = _log_calls()
    assert len(calls) > 30  # the scan sees the library's logging
    bad = [f"{where}:{line}: {ast.unparse(arg) if arg is not None else '(no event)'}"
           for where, line, arg in calls
           if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                   and EVENT.fullmatch(arg.value))]
    assert not bad, "log events must be dotted lower-case names:\n" + "\n".join(bad)


def test_loggers_are_named_by_module() -> None:
    for path in sorted(STEM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "get_logger"):
                assert [ast.unparse(a) for a in node.args] == ["__name__"], (
                    f"{path.relative_to(STEM.parent)}:{node.lineno}: use get_logger(__name__)")
