"""sqlite adapters (being built)."""
