"""postgres adapters (being built)."""
