"""The claim must walk the partial index `jobs_claimable` in (rank, id) order, not sort the backlog.

The candidate query lives inside the plpgsql function aibot.claim_jobs, so instead of copying its text
here (which could drift) the test captures the plan the function actually executes, with auto_explain
logging nested statements to this session as LOG messages. The test database is a superuser
connection in every supported setup (env URL, testcontainers, pgserver), which LOAD needs.

The embedded Postgres (pgserver) ships without contrib, so no auto_explain: there the statement is read
from the installed function's own source (pg_proc.prosrc, so it cannot drift either), prepared with its
plpgsql variables as parameters, and explained both as a custom and as a generic plan — the two plans
plpgsql can run it with.
"""

from __future__ import annotations

import json
import re

import psycopg
import pytest

from aibot import db
from aibot.queue import jobs

CANDIDATE_MARK = "ORDER BY j.rank, j.id"


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


def _has_auto_explain(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.UndefinedFile:
        return False
    return True


def _candidate_plans(url: str, *, use_slots: bool, calls: int = 8) -> list[dict]:
    with db.connect(url, autocommit=True) as conn:
        logged = _has_auto_explain(conn)
    if logged:
        return _logged_plans(url, use_slots=use_slots, calls=calls)
    return _explained_plans(url, use_slots=use_slots)[:calls]


def _candidate_statement(conn: psycopg.Connection) -> str:
    """The cursor's SELECT as installed, its plpgsql variables turned into $1..$3."""
    src = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'claim_jobs'").fetchone()["prosrc"]
    match = re.search(r"OPEN v_cur FOR\s+(SELECT.*?SKIP LOCKED);", src, re.S)
    assert match, "claim_jobs no longer opens its candidate cursor with OPEN v_cur FOR SELECT ... SKIP LOCKED"
    stmt = match.group(1)
    assert CANDIDATE_MARK in stmt
    for name, param in (("p_use_slots", "$1::boolean"), ("v_models", "$2::text[]"), ("p_max_scan", "$3::integer")):
        stmt = re.sub(rf"\b{name}\b", param, stmt)
    return stmt


def _explained_plans(url: str, *, use_slots: bool) -> list[dict]:
    """The candidate statement's custom and generic plans, with the arguments claim_jobs would pass."""
    plans = []
    with db.connect(url, autocommit=True) as conn:
        stmt = _candidate_statement(conn)
        models = conn.execute(
            "SELECT coalesce(array_agg(DISTINCT model), '{}') AS models FROM aibot.free_slots").fetchone()["models"]
        # Utility statements take no protocol-level parameters: a client-side cursor sends them whole.
        client = psycopg.ClientCursor(conn)
        client.execute(f"PREPARE candidates(boolean, text[], integer) AS {stmt}")
        for mode in ("force_custom_plan", "force_generic_plan"):
            conn.execute(f"SET plan_cache_mode = {mode}")
            with conn.transaction():
                row = client.execute("EXPLAIN (FORMAT JSON) EXECUTE candidates(%s, %s, %s)",
                                     (use_slots, models, jobs.DEFAULT_MAX_SCAN)).fetchone()
            (doc,) = row.values()
            doc = json.loads(doc) if isinstance(doc, str) else doc
            plans.append(doc[0]["Plan"])
        conn.execute("DEALLOCATE candidates")
        conn.execute("RESET plan_cache_mode")
    return plans


def _logged_plans(url: str, *, use_slots: bool, calls: int = 8) -> list[dict]:
    """Runs `calls` claims in one session with auto_explain on; returns the candidate statement's plans.

    More than five calls, because plpgsql may switch a statement to a cached generic plan after five.
    """
    logged: list[str] = []
    with db.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: logged.append(diag.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_nested_statements = on")
        conn.execute("SET auto_explain.log_format = 'json'")
        conn.execute("SET client_min_messages = log")
        claimed = [jobs.claim(conn, "plan-test", lease_seconds=60, use_slots=use_slots) for _ in range(calls)]
        conn.execute("SET client_min_messages = notice")
    assert claimed[0] is not None, "the fixture has runnable jobs, the claim should get one"
    plans = []
    for message in logged:
        start = message.find("{")
        if start < 0:
            continue
        doc = json.loads(message[start:])
        if CANDIDATE_MARK in doc.get("Query Text", ""):
            plans.append(doc["Plan"])
    assert len(plans) == calls, f"expected {calls} logged plans of the candidate query, got {len(plans)}"
    return plans


def _assert_walks_claimable_index(plan: dict) -> None:
    nodes = list(_nodes(plan))
    kinds = [n["Node Type"] for n in nodes]
    scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
    assert scans, f"no scan of jobs in plan: {kinds}"
    assert all(n["Node Type"] == "Index Scan" and n.get("Index Name") == "jobs_claimable" for n in scans), \
        f"candidate query no longer walks jobs_claimable: {[(n['Node Type'], n.get('Index Name')) for n in scans]}"
    assert "Sort" not in kinds, f"candidate query sorts instead of reading index order: {kinds}"


@pytest.fixture
def filled(db_url, conn):
    _fill(conn)
    return db_url


@pytest.mark.parametrize("use_slots", [False, True])
def test_claim_walks_the_partial_index(filled, use_slots):
    for plan in _candidate_plans(filled, use_slots=use_slots):
        _assert_walks_claimable_index(plan)


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
