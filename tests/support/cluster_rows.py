"""Test helpers that write cluster rows (servers, loaded models, slots) straight into Postgres."""

from __future__ import annotations

from aibot.queue import jobs


def server(conn, name: str, **cols) -> int:
    cols = {"health": "healthy", **cols}
    names = ", ".join(["name", "url", *cols])
    marks = ", ".join(["%s"] * (len(cols) + 2))
    return conn.execute(f"INSERT INTO aibot.servers ({names}) VALUES ({marks}) RETURNING id",
                        [name, f"http://127.0.0.1/{name}", *cols.values()]).fetchone()["id"]


def slots(conn, server_id: int, model: str, n: int = 1, *, parallel: int | None = None) -> list[int]:
    conn.execute("""INSERT INTO aibot.model_instances (server_id, model, parallel) VALUES (%s, %s, %s)
                    ON CONFLICT DO NOTHING""", (server_id, model, parallel or n))
    return [r["id"] for r in conn.execute(
        "INSERT INTO aibot.slots (server_id, model) SELECT %s, %s FROM generate_series(1, %s) RETURNING id",
        (server_id, model, n))]


def job(mid: str, model: str = "m1", priority: int = 50, **kw) -> jobs.NewJob:
    return jobs.NewJob(source="chat", source_message_id=mid, entity_id="e1", model=model, priority=priority, **kw)


def register_sims(conn, sims: dict, memory_gb: float = 128) -> dict[str, dict]:
    """Registers running simulators as servers (by name, of the kind their API is), refreshes what they
    hold and sizes the slots, the way the scheduler would; returns the server rows by name."""
    from aibot.backends.factory import backend_for_server
    from aibot.cluster import refresh, slots, state
    from aibot.config import ServerConfig

    refresh.sync_servers(conn, [ServerConfig.model_validate({"name": n, "url": s.url, "kind": s.config.api,
                                                             "capabilities": {"maxMemory": memory_gb}})
                                for n, s in sims.items()])
    rows = {r["name"]: r for r in state.servers(conn)}
    for r in rows.values():
        backend = backend_for_server(r)
        try:
            assert refresh.refresh_server(conn, r, backend).ok
        finally:
            backend.close()
    slots.rebalance(conn, {})
    return {r["name"]: r for r in state.servers(conn)}
