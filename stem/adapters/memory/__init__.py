"""memory adapters (being built)."""
