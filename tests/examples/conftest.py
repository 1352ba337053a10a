"""Example apps read ``STEM_BROKER_URL`` when imported: each smoke test imports its
example afresh on the test's own SQLite file."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import WorkerProcesses


@pytest.fixture
def fresh_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                 ) -> Iterator[Callable[[str], ModuleType]]:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    monkeypatch.setenv("STEM_BROKER_URL", url)
    monkeypatch.delenv("STEM_RESULT_BACKEND_URL", raising=False)
    before = set(sys.modules)

    def load(name: str) -> ModuleType:
        package = name.rsplit(".", 1)[0]
        for mod in [m for m in sys.modules if m.startswith(package)]:
            del sys.modules[mod]
        return importlib.import_module(name)

    yield load
    for mod in set(sys.modules) - before:
        if mod.startswith("examples."):
            del sys.modules[mod]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path)
    yield procs
    procs.kill_all()
