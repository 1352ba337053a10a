"""Stem CLI."""
