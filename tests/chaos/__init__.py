"""Chaos tests: crash, restart and fault injection against a real deployment (see docs/reliability.md)."""
