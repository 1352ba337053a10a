"""redis adapters (being built)."""
