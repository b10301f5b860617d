"""The memory invariant as the cluster reports it, checked against the sizing that decides it.

`aibot.cluster.sizing` is the one statement of the accounting (models + a buffer per request in flight
+ system reserve + safety margin); the `server_health` view, `aibot status` and `/metrics` must show
exactly its figures. `mismatches` compares them for every server in one snapshot of the database.
"""

from __future__ import annotations

from aibot import db
from aibot.cluster import state
from aibot.cluster.sizing import Budget, accounted_bytes
from aibot.ops import inspection


def sizing_accounted(conn, server: dict, held: int) -> int:
    return accounted_bytes(Budget.from_row(server), state.as_instances(state.instances(conn, server["id"])), held)


def mismatches(db_url: str) -> list[str]:
    """One line per server whose view figures differ from the sizing's (empty = they agree)."""
    out = []
    with db.connect(db_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        servers = {s["id"]: s for s in state.servers(conn)}
        for row in inspection.server_health(conn):
            expected = sizing_accounted(conn, servers[row["id"]], row["slots_used"])
            left = None if row["memory_bytes"] is None else row["memory_bytes"] - expected
            if (row["accounted_bytes"], row["budget_left_bytes"]) != (expected, left):
                out.append(f"{row['name']}: view accounts {row['accounted_bytes']} (left {row['budget_left_bytes']}), "
                           f"sizing {expected} (left {left})")
    return out
