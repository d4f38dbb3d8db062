"""Helpers for the wire tests: a peer process and small utilities (no mocks)."""
