"""Datasets: reading entries, validating them, loading clips, and synthetic clips for tests."""
