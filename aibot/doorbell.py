"""Wake-ups for the claim actor (stub until the workers module lands; see docs/internals.md)."""

from __future__ import annotations


def ring(conn, n: int) -> int:
    """Enqueues up to `n` claim-actor messages in the caller's transaction; returns how many."""
    return 0
