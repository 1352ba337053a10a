"""The stem pytest plugin is registered by the package and its default fixtures work."""

from __future__ import annotations

import pytest

import stem
from stem.worker import Worker


def test_the_plugin_is_loaded_by_its_entry_point(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("stem")
    assert plugin is not None and plugin.__name__ == "stem.testing.pytest_plugin"


async def test_default_stem_app_is_a_fresh_app_on_the_tests_memory_url(
        stem_app: stem.Stem, stem_memory_url: str, stem_worker: Worker) -> None:
    assert stem_app.broker_url == stem_app.backend_url == stem_memory_url

    @stem_app.task(name="plugin.double")
    async def double(x: int) -> int:
        return 2 * x

    # Registered after the worker started: it listens on the default queue anyway.
    task_id = await double.enqueue(21)
    assert (await double.wait(task_id, timeout=10)).value == 42


def test_each_test_gets_its_own_memory_url(stem_memory_url: str) -> None:
    assert stem_memory_url.startswith("memory://t")
