"""Faults at the scope they belong to: a (server, model) pair is refused or backed off without touching
the server's other models, a down server is probed back within seconds, and a flapping one is held."""

from __future__ import annotations

import random

import pytest

from aibot.cluster import health, state
from aibot.queue import jobs
from tests.support.cluster_rows import job, server, slots

pytestmark = pytest.mark.timeout(60)


def claim(conn):
    return jobs.claim(conn, "w", lease_seconds=60)


def blocked(conn) -> dict:
    return {(r["server_id"], r["model"]): r["why"] for r in conn.execute("SELECT * FROM aibot.blocked_pairs")}


def test_a_models_faults_back_off_that_pair_only(conn):
    sid = server(conn, "s")
    slots(conn, sid, "a", 2)
    slots(conn, sid, "b", 2)
    jobs.enqueue_many(conn, [job("1", "a"), job("2", "b")])
    rng = random.Random(3)
    states = [health.record_model_fault(conn, sid, "a", "BadResponse: stream cut", rng=rng)
              for _ in range(health.FAULT_THRESHOLD)]
    assert [s["tripped"] for s in states] == [False, False, True]
    assert blocked(conn) == {(sid, "a"): "backoff"}
    got = claim(conn)
    assert got is not None and got.model == "b"          # a's job waits, b's is served
    assert claim(conn) is None
    srv = state.server_by_id(conn, sid)
    assert (srv["health"], srv["failure_count"]) == ("healthy", 0)   # the server itself is untouched

    assert health.record_model_ok(conn, sid, "a")
    assert blocked(conn) == {}
    assert claim(conn).model == "a"


def test_a_refusal_blocks_the_pair_until_the_catalogue_or_the_config_changes(conn):
    sid = server(conn, "s")
    slots(conn, sid, "x@f16", 1)
    conn.execute("UPDATE aibot.servers SET catalogue_fingerprint = 'cat1' WHERE id = %s", (sid,))
    jobs.enqueue_many(conn, [job("1", "x@f16")])
    assert health.mark_unavailable(conn, sid, "x@f16", "model_not_found: x@f16", "cfg1")
    assert not health.mark_unavailable(conn, sid, "x@f16", "model_not_found: x@f16", "cfg1")  # logged once
    assert blocked(conn) == {(sid, "x@f16"): "unavailable"}
    assert claim(conn) is None

    # Same catalogue, same config: still refused. Another catalogue: tried again.
    assert health.clear_stale_refusals(conn, sid, "cat1") == []
    assert health.clear_config_refusals(conn, "cfg1") == []
    assert health.clear_stale_refusals(conn, sid, "cat2") == ["x@f16"]
    assert blocked(conn) == {}

    health.mark_unavailable(conn, sid, "x@f16", "model_not_found: x@f16", "cfg1")
    assert [model for _, model in health.clear_config_refusals(conn, "cfg2")] == ["x@f16"]
    assert claim(conn) is not None


def test_waiting_jobs_are_told_why_once(conn):
    jobs.enqueue_many(conn, [job(str(i), "gone") for i in range(3)] + [job("9", "other")])
    conn.execute("UPDATE aibot.jobs SET last_error = 'HTTP 500' WHERE source_message_id = '2'")
    assert jobs.note_waiting(conn, "gone", "no server offers 'gone'") == 3
    assert jobs.note_waiting(conn, "gone", "no server offers 'gone'") == 0
    notes = {r["source_message_id"]: (r["waiting_reason"], r["last_error"]) for r in conn.execute("SELECT * FROM aibot.jobs")}
    why = "no server offers 'gone'"
    assert notes == {"0": (why, None), "1": (why, None), "2": (why, "HTTP 500"), "9": (None, None)}   # the error stays


def _trip(conn, sid):
    for _ in range(health.FAULT_THRESHOLD):
        state = health.record_fault(conn, sid, "Unreachable: refused")
    return state


def test_a_down_server_is_probed_at_the_cadence_whatever_its_backoff(conn):
    sid = server(conn, "s")
    assert _trip(conn, sid).tripped
    # A long backoff ahead does not delay the probe: it is due once not probed for the cadence.
    conn.execute("UPDATE aibot.servers SET backoff_until = now() + interval '5 minutes', probed_at = now() "
                 "WHERE id = %s", (sid,))
    assert [r["id"] for r in health.due_probes(conn)] == []
    conn.execute("UPDATE aibot.servers SET probed_at = now() - make_interval(secs => %s) WHERE id = %s",
                 (health.PROBE_EVERY_SECONDS + 0.5, sid))
    [due] = health.due_probes(conn)
    assert due["id"] == sid and not due["flapping"]   # an isolated outage: a probe that answers restores it


def test_a_trip_soon_after_recovery_escalates_and_holds_the_server_down(conn):
    sid = server(conn, "s")
    first = _trip(conn, sid)
    assert first.backoff_level == 1
    health.record_ok(conn, sid)                       # recovered
    second = _trip(conn, sid)                         # ... and failed again within the flap window
    assert second.tripped and second.backoff_level == 2
    conn.execute("UPDATE aibot.servers SET probed_at = NULL WHERE id = %s", (sid,))
    [due] = health.due_probes(conn)
    assert due["flapping"]

    # Stable for longer than the flap window: the next trip starts over at level 1.
    health.record_ok(conn, sid)
    conn.execute("UPDATE aibot.servers SET recovered_at = now() - make_interval(secs => %s) WHERE id = %s",
                 (health.FLAP_SECONDS + 1, sid))
    assert _trip(conn, sid).backoff_level == 1


def test_repeated_failed_loads_escalate_the_pair_backoff(conn):
    sid = server(conn, "s")
    levels = []
    for _ in range(3):
        row = health.record_model_fault(conn, sid, "m", "LoadFailed: exit code 1", threshold=1)
        levels.append(row["backoff_level"])
        # the backoff ends without a recovery in between (the next load is tried, and fails again)
        conn.execute("UPDATE aibot.model_health SET backoff_until = now() WHERE server_id = %s", (sid,))
    assert levels == [1, 2, 3]


def test_waiting_notes_are_cleared_once_the_model_can_be_served(conn):
    jobs.enqueue_many(conn, [job("1", "m"), job("2", "m")])
    jobs.note_waiting(conn, "m", "no server can load 'm'")
    conn.execute("UPDATE aibot.jobs SET last_error = 'HTTP 500' WHERE source_message_id = '2'")
    assert jobs.clear_waiting(conn, "m") == 2
    assert jobs.clear_waiting(conn, "m") == 0
    assert {r["source_message_id"]: (r["waiting_reason"], r["last_error"]) for r in conn.execute("SELECT * FROM aibot.jobs")} == \
        {"1": (None, None), "2": (None, "HTTP 500")}          # a real error stays


def test_a_claim_drops_the_waiting_note_a_late_writer_left(conn):
    """CI (real router): a demand pass planned from a snapshot without servers wrote "no server is
    registered yet" after the loader had cleared the notes; the job was then served with the note on
    it. A claimed job is not waiting, so the claim drops such a note; a real error stays."""
    sid = server(conn, "s")
    slots(conn, sid, "m", 2)
    jobs.enqueue_many(conn, [job("1", "m", priority=0), job("2", "m", priority=1)])
    jobs.note_waiting(conn, "m", "no server can load 'm': no server is registered yet")
    conn.execute("UPDATE aibot.jobs SET last_error = 'HTTP 500' WHERE source_message_id = '2'")
    assert claim(conn) is not None and claim(conn) is not None
    notes = {r["source_message_id"]: (r["state"], r["waiting_reason"], r["last_error"])
             for r in conn.execute("SELECT * FROM aibot.jobs")}
    assert notes == {"1": ("running", None, None), "2": ("running", None, "HTTP 500")}
