"""How a user points the stem plugin's fixtures at their own app."""

from __future__ import annotations

import pytest

import stem
from stem.testing.pytest_plugin import StemAppFactory
from tests.plugin.shop_app import app


@pytest.fixture
def stem_app(stem_app_factory: StemAppFactory) -> stem.Stem:
    """The project's app, on a memory:// store of this test alone."""
    return stem_app_factory(app)
