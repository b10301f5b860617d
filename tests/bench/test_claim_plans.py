"""bench/common.py's claim-plan check, which bench/scaling.py runs at every point: it must find the
statements a claim runs and must be able to say "Seq Scan".

On the embedded Postgres (no contrib, so no auto_explain) this exercises the fallback: the candidate
and slot-choice statements read from the installed claim_jobs and explained with custom and generic
plans. With auto_explain available it exercises the logged plans instead; both must report scans.
"""

from __future__ import annotations

import pytest

from aibot.harness import claim_plans
from aibot.queue import jobs
from bench import common, scaling


def _claim(conn):
    return jobs.claim(conn, "plan-test", lease_seconds=60, use_slots=True)


@pytest.fixture
def small_cluster(conn, db_url):
    rows = scaling.build_cluster(conn, servers=3, models=4, rows_per_pair=2)
    scaling.add_jobs(conn, 5000, models=4)
    scaling.analyze(conn)
    assert rows == 3 * 4 * 2
    return db_url


def test_claim_plans_cover_the_candidate_and_slot_choice(small_cluster):
    plans = common.claim_plans(small_cluster, claim=_claim)
    verdict = common.plan_verdict(plans)
    scans = [s for st in verdict["statements"] for s in st["scans"]]
    assert any("jobs using jobs_claimable" in s for s in scans), verdict
    assert any(s.endswith(" slots") or " slots " in s for s in scans), verdict
    assert all(p["plan"] for p in plans), [p["query"] for p in plans if not p["plan"]]


def test_plan_verdict_flags_a_seq_scan_of_jobs():
    plan = {"Node Type": "Limit", "Plans": [{"Node Type": "Seq Scan", "Relation Name": "jobs"}]}
    verdict = common.plan_verdict([{"query": "SELECT 1", "plan": plan, "how": "test"}])
    assert not verdict["ok"] and verdict["seq_scans"] == ["jobs"]


def test_plan_verdict_passes_index_scans_and_ignores_other_tables():
    plan = {"Node Type": "Nested Loop", "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "jobs", "Index Name": "jobs_claimable"},
        {"Node Type": "Seq Scan", "Relation Name": "servers"}]}
    verdict = common.plan_verdict([{"query": "SELECT 1", "plan": plan, "how": "test"}])
    assert verdict["ok"], verdict
    assert verdict["statements"][0]["scans"] == ["Index Scan jobs using jobs_claimable", "Seq Scan servers"]


def test_plan_verdict_without_plans_is_not_ok():
    assert not common.plan_verdict([])["ok"]


def test_claim_statements_found_in_the_installed_function(conn):
    src = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'claim_jobs'").fetchone()["prosrc"]
    found = claim_plans._claim_statements(src)
    assert set(found) == {"servable", "candidate", "candidate_no_slots", "slot_sample", "slot_choice"}
    assert "$1::text[]" in found["candidate"][1] and "v_free" not in found["candidate"][1]
    assert "$1::text" in found["slot_choice"][1] and "$2::integer" in found["slot_choice"][1]
    assert "INTO" not in found["slot_choice"][1] and "INTO" not in found["servable"][1]
    # the function's constants are inlined: a PREPAREd statement cannot see plpgsql names
    assert not any("c_free_cap" in stmt or "c_sampled" in stmt for _, stmt in found.values())


def test_fallback_explains_every_statement_of_the_slot_aware_claim(small_cluster):
    """The prosrc path (used where Postgres has no auto_explain, as the embedded one) finds, runs and
    explains the servable-models read, the candidate walk and both slot-choice reads."""
    plans = claim_plans._explained_claim_plans(small_cluster, use_slots=True)
    assert all(p["plan"] for p in plans), [p["query"] for p in plans if not p["plan"]]
    names = {p["how"].split()[1] for p in plans}
    assert names == {"servable", "candidate", "slot_sample", "slot_choice"}
    # 24 slot rows: a Seq Scan of slots is the cheapest plan here; bench/scaling.py checks slots at scale
    assert common.plan_verdict(plans, tables=("jobs",))["ok"], common.plan_verdict(plans)
