"""The safety margin is stated once, in `aibot.cluster.sizing`: 10 % of (RAM − system reserve). The
`server_health` view (and through it `aibot status` and `/metrics`) accounts the figure the refresh
stores from it, so the seed's own case gives one number everywhere. The view used to take 10 % of the
whole RAM: 128.8 GB accounted and −0.8 GB left, "invariant broken", for a server that is exactly full.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from aibot.cluster import refresh, slots, state
from aibot.cluster.sizing import GB, Budget, Instance, accounted_bytes, server_slots
from aibot.config import ServerConfig
from aibot.ops import inspection
from aibot.queue import jobs
from aibot.web import metrics
from tests.support import accounting

MODELS = [f"m{i}" for i in range(1, 7)]


def seed_case(conn) -> dict:
    """128 GB, six 15 GB models loaded, the six slots the formula gives all held."""
    refresh.sync_servers(conn, [ServerConfig.model_validate({"name": "mac", "ip": "127.0.0.1",
                                                             "capabilities": {"maxMemory": 128}})])
    server = state.server_by_name(conn, "mac")
    for model in MODELS:
        conn.execute("INSERT INTO aibot.model_instances (server_id, model, state, size_bytes, parallel) "
                     "VALUES (%s, %s, 'loaded', %s, 1)", (server["id"], model, 15 * GB))
    conn.execute("UPDATE aibot.servers SET health = 'healthy' WHERE id = %s", (server["id"],))
    slots.rebalance(conn, {})
    jobs.enqueue_many(conn, [jobs.NewJob("chat", m, "e", m, 50) for m in MODELS])
    claimed = [jobs.claim(conn, "w", lease_seconds=60) for _ in MODELS]
    assert all(c is not None and c.slot_id is not None for c in claimed)
    return state.server_by_name(conn, "mac")


def test_the_seed_case_is_exactly_full_in_sizing(conn):
    server = seed_case(conn)
    budget = Budget.from_row(server)
    instances = [Instance(m, 15 * GB) for m in MODELS]
    assert budget.safety_bytes == 12 * GB and server["safety_bytes"] == 12 * GB
    assert server_slots(budget, instances).slots == 6
    assert accounted_bytes(budget, instances, 6) == 128 * GB


def test_view_and_metrics_account_what_sizing_accounts(conn, database):
    seed_case(conn)
    [row] = [r for r in inspection.server_health(conn) if r["name"] == "mac"]
    assert row["slots_used"] == 6
    assert row["accounted_bytes"] == 128 * GB and row["budget_left_bytes"] == 0
    samples = {s.labels["server"]: s.value for family in text_string_to_metric_families(
        metrics.exposition(database).decode()) for s in family.samples if s.name == "aibot_server_accounted_bytes"}
    assert samples["mac"] == 128 * GB
    assert accounting.mismatches(database.url) == []


def test_a_server_that_was_never_sized_shows_no_accounting_rather_than_a_guess(conn):
    conn.execute("INSERT INTO aibot.servers (name, url, memory_bytes) VALUES ('raw', 'http://127.0.0.1:1', %s)",
                 (64 * GB,))
    [row] = [r for r in inspection.server_health(conn) if r["name"] == "raw"]
    assert row["accounted_bytes"] is None and row["budget_left_bytes"] is None
    refresh.sync_servers(conn, [ServerConfig.model_validate({"name": "raw", "url": "http://127.0.0.1:1",
                                                             "capabilities": {"maxMemory": 64}})])
    [row] = [r for r in inspection.server_health(conn) if r["name"] == "raw"]
    assert row["accounted_bytes"] == 8 * GB + 5_600_000_000, "reserve + 10 % of (64 − 8) GB"
