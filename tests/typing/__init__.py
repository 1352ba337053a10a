"""mypy checks of the typed task API: ``pass_*.py`` must be clean, ``fail_*.py`` must fail."""
