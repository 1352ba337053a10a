"""Stem for Python."""
