"""The claim must read the queue's head from an index, never sort or filter the backlog: without slots
it walks `jobs_claimable` in (rank, id) order; with slots it walks the head of each servable model's
queue (`jobs_claimable_model`) and the stored replies (`jobs_deliverable`), each bounded by a LIMIT, and
merges those few rows (0009_scheduling.sql).

The candidate query lives inside the plpgsql function aibot.claim_jobs, so instead of copying its text
here (which could drift) the test captures the plan the function actually executes, with auto_explain
logging nested statements to this session as LOG messages. The test database is a superuser
connection in every supported setup (env URL, testcontainers, pgserver), which LOAD needs.

The embedded Postgres (pgserver) ships without contrib, so no auto_explain: there the statement is read
from the installed function's own source (pg_proc.prosrc, so it cannot drift either) and explained both
as a custom and as a generic plan. Both ways live in aibot.harness.claim_plans (the scaling benchmark
uses them too).
"""

from __future__ import annotations

import psycopg
import pytest

from aibot.harness.claim_plans import CANDIDATE_MARK, claim_plans
from aibot.queue import jobs


def _fill(conn: psycopg.Connection) -> None:
    """100k rows: mostly finished, some running, ~12% queued (a fifth of those deferred)."""
    conn.execute("""
        INSERT INTO aibot.jobs (source, source_message_id, entity_id, model, priority, rank, state,
                                available_at, finished_at, attempts)
        SELECT 'plan', g::text, 'e' || (g % 7), 'model-' || (g % 5), g % 100,
               extract(epoch FROM now()) - 100000 + g + (g % 100) * 30,
               CASE WHEN g % 8 = 0 THEN 'queued'
                    WHEN g % 8 = 1 THEN 'running'
                    WHEN g % 8 = 2 THEN 'dead'
                    ELSE 'done' END::aibot.job_state,
               CASE WHEN g % 40 = 0 THEN now() + interval '1 hour' ELSE now() - interval '1 minute' END,
               CASE WHEN g % 8 IN (2, 3, 4, 5, 6, 7) THEN now() - interval '1 day' END,
               1
        FROM generate_series(1, 100000) g
    """)
    conn.execute("INSERT INTO aibot.servers (name, url, health) VALUES ('plan-s1', 'http://127.0.0.1:1', 'healthy')")
    conn.execute("""INSERT INTO aibot.slots (server_id, model)
                    SELECT id, 'model-' || m FROM aibot.servers, generate_series(0, 2) m""")
    conn.execute("ANALYZE aibot.jobs")
    conn.execute("ANALYZE aibot.slots")
    conn.execute("ANALYZE aibot.servers")


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _candidate_plans(url: str, *, use_slots: bool, calls: int = 8) -> list[dict]:
    """The candidate statement's plans as claim_jobs runs it (aibot.harness.claim_plans): with auto_explain,
    `calls` real claims in one session (more than five, because plpgsql may switch a statement to a
    cached generic plan after five); without it, its custom and generic plans."""
    plans = claim_plans(url, claim=lambda conn: jobs.claim(conn, "plan-test", lease_seconds=60, use_slots=use_slots),
                        calls=calls, use_slots=use_slots)
    candidates = [p for p in plans if CANDIDATE_MARK in p["query"]]
    assert candidates, f"no plan of the candidate query among {[p['query'][:60] for p in plans]}"
    if candidates[0]["how"] == "auto_explain":
        assert len(candidates) == calls, f"expected {calls} logged plans of the candidate query, got {len(candidates)}"
    return [p["plan"] for p in candidates][:calls]


def _assert_walks_claimable_index(plan: dict) -> None:
    nodes = list(_nodes(plan))
    kinds = [n["Node Type"] for n in nodes]
    scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
    assert scans, f"no scan of jobs in plan: {kinds}"
    assert all(n["Node Type"] == "Index Scan" and n.get("Index Name") == "jobs_claimable" for n in scans), \
        f"candidate query no longer walks jobs_claimable: {[(n['Node Type'], n.get('Index Name')) for n in scans]}"
    assert "Sort" not in kinds, f"candidate query sorts instead of reading index order: {kinds}"


def _bounded_scans(plan: dict, bound: tuple = ()) -> list[tuple[dict, tuple]]:
    """(scan of jobs, the Limit/Sort nodes above it, nearest first)."""
    here = (plan["Node Type"],) + bound if plan["Node Type"] in ("Limit", "Sort") else bound
    found = [(plan, bound)] if plan.get("Relation Name") == "jobs" else []
    for child in plan.get("Plans", []):
        found += _bounded_scans(child, here)
    return found


def _assert_walks_each_models_head(plan: dict) -> None:
    scans = _bounded_scans(plan)
    assert scans, f"no scan of jobs in plan: {[n['Node Type'] for n in _nodes(plan)]}"
    used = {(n["Node Type"], n.get("Index Name")) for n, _ in scans}
    assert used <= {("Index Scan", "jobs_claimable_model"), ("Index Scan", "jobs_claimable"),
                    ("Index Scan", "jobs_deliverable")}, f"candidate query reads jobs another way: {used}"
    assert ("Index Scan", "jobs_deliverable") in used, f"stored replies not read from jobs_deliverable: {used}"
    for n, above in scans:
        assert above and above[0] == "Limit", \
            f"{n['Node Type']} on {n.get('Index Name')} is not bounded by its own LIMIT (above it: {above})"


@pytest.fixture
def filled(db_url, conn):
    _fill(conn)
    return db_url


def test_claim_without_slots_walks_the_partial_index(filled):
    for plan in _candidate_plans(filled, use_slots=False):
        _assert_walks_claimable_index(plan)


def test_slot_aware_claim_walks_each_servable_models_head(filled):
    for plan in _candidate_plans(filled, use_slots=True):
        _assert_walks_each_models_head(plan)


def test_backlog_of_a_model_nobody_holds_is_not_walked(filled, conn):
    """The case the per-model walk exists for: 30k queued jobs of a model no server holds rank ahead of
    everything. The claim reads that model's queue through no index, and still claims a servable job."""
    conn.execute("""
        INSERT INTO aibot.jobs (source, source_message_id, entity_id, model, priority, rank, state, attempts)
        SELECT 'plan', 'unplaced-' || g, 'e', 'model-unplaced', 0, g, 'queued', 0
        FROM generate_series(1, 30000) g""")
    conn.execute("ANALYZE aibot.jobs")
    got = jobs.claim(conn, "plan-test-2", lease_seconds=60, use_slots=True)
    assert got is not None and got.model in ("model-0", "model-1", "model-2"), got
    for plan in _candidate_plans(filled, use_slots=True):
        _assert_walks_each_models_head(plan)
        assert not any(n.get("Index Name") == "jobs_claimable" for n in _nodes(plan)), \
            "the walk reads the whole queue in rank order (with the unplaced backlog) instead of per model"


def test_check_notices_a_walk_that_is_not_bounded():
    """The guard must be able to fail: a sort over a scan of jobs (the backlog sorted) is refused."""
    sorted_backlog = {"Node Type": "Limit", "Plans": [{"Node Type": "Sort", "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "jobs", "Index Name": "jobs_deliverable"}]}]}
    with pytest.raises(AssertionError, match="not bounded"):
        _assert_walks_each_models_head(sorted_backlog)


def test_check_notices_when_the_index_is_gone(filled, conn):
    """The guard must be able to fail: without jobs_claimable the same statement sorts."""
    conn.execute("DROP INDEX aibot.jobs_claimable")
    conn.execute("ANALYZE aibot.jobs")
    with pytest.raises(AssertionError, match="jobs_claimable|sorts"):
        _assert_walks_claimable_index(_candidate_plans(filled, use_slots=False, calls=1)[0])


def test_check_notices_when_the_index_order_changes(filled, conn):
    conn.execute("DROP INDEX aibot.jobs_claimable")
    conn.execute("CREATE INDEX jobs_claimable ON aibot.jobs (id, rank) WHERE state = 'queued'")
    conn.execute("ANALYZE aibot.jobs")
    with pytest.raises(AssertionError, match="jobs_claimable|sorts"):
        _assert_walks_claimable_index(_candidate_plans(filled, use_slots=False, calls=1)[0])


def test_the_claims_instance_lookup_is_by_key_however_large_the_cluster(conn):
    # 200 servers × 6 models: the claim statement finds each claimed job's serving instance by primary
    # key. Joined plainly, the planner took claim_jobs for its default 1,000 rows and hashed every
    # model_instances row on every claim (bench/scaling.py, the servers sweep).
    conn.execute("INSERT INTO aibot.servers (name, url) "
                 "SELECT 'inst-' || g, 'http://127.0.0.1:' || (1000 + g) FROM generate_series(1, 200) g")
    conn.execute("INSERT INTO aibot.model_instances (server_id, model) "
                 "SELECT s.id, 'model-' || m FROM aibot.servers s, generate_series(0, 5) m")
    conn.execute("ANALYZE aibot.model_instances")
    row = conn.execute("EXPLAIN (FORMAT JSON) " + jobs.queries.sql("jobs_claim"), {
        "worker_id": "plan-test", "lease_seconds": 60.0, "use_slots": True, "limit": 1, "max_scan": 100}).fetchone()
    nodes = list(_nodes(next(iter(row.values()))[0]["Plan"]))
    scans = [(n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "model_instances"]
    assert scans == [("Index Scan", "model_instances_pkey")], scans
