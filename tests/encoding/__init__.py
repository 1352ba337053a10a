"""Payload encoders, wire fixtures and the typed producer API."""
