"""Benchmarks of the pack (not part of the test suite beyond smoke runs)."""
