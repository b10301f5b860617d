"""Ingest against real Postgres: jobs, dedupe, rejects recorded once, cursor moved atomically."""

from __future__ import annotations

import pytest

from aibot import db
from aibot.bot import cursor, ingest as ingest_mod
from aibot.bot.ingest import ingest
from aibot.bot.sources import Incoming, parse_lines
from aibot.config import load_config
from tests.bot.test_rules import human, write_config
from tests.support.cluster_rows import server, slots


@pytest.fixture
def config(tmp_path):
    return load_config(write_config(tmp_path))


def jobs(conn):
    return conn.execute("SELECT * FROM aibot.jobs ORDER BY id").fetchall()


def msg(mid, text="hi", entity="alice", **params):
    m = human(text, entity, **params)
    m["id"] = mid
    return m


def test_messages_become_jobs_with_everything_the_worker_needs(conn, config):
    r = ingest(conn, "chat", [msg("a", priority=0, ais="Zed:random", context=["x: 1"]),
                              msg("b", entity="bob", model="special")], config, cursor="pos-1")
    assert (r.new, r.duplicate, r.rejected, r.ignored) == (2, 0, 0, 0)
    rows = jobs(conn)
    assert [(j["source"], j["source_message_id"], j["entity_id"], j["state"]) for j in rows] == [
        ("chat", "a", "alice", "queued"), ("chat", "b", "bob", "queued")]
    a, b = rows
    assert (a["priority"], a["model"]) == (0, "alice@f16")
    assert (b["priority"], b["model"]) == (40, "special")      # queueSettings.defaultPriority; model override
    assert a["max_attempts"] == 4                                # queueSettings.maxRetries
    assert a["payload"]["text"] == "hi" and a["payload"]["context"] == ["x: 1"]
    assert a["payload"]["ais"]["name"] == "Zed" and len(a["payload"]["ais"]["color"]) == 9
    assert a["message_at"] is not None
    assert cursor.load(conn, "chat") == "pos-1"
    assert sorted(r.job_ids) == [a["id"], b["id"]]


def test_reingesting_is_a_no_op(conn, config):
    batch = [msg("a"), msg("b", entity="nobody")]
    first = ingest(conn, "chat", batch, config)
    again = ingest(conn, "chat", batch, config)
    assert (first.new, first.rejected) == (1, 1)
    assert (again.new, again.rejected, again.duplicate) == (0, 0, 2)
    assert len(jobs(conn)) == 2


def test_the_same_message_for_another_source_or_entity_is_a_separate_job(conn, config):
    ingest(conn, "chat", [msg("a")], config)
    r = ingest(conn, "stdin", [msg("a"), msg("a", entity="bob")], config)
    assert r.new == 2 and len(jobs(conn)) == 3


def test_duplicates_inside_one_batch(conn, config):
    r = ingest(conn, "chat", [msg("a"), msg("a"), msg("x", entity="nobody"), msg("x", entity="nobody")], config)
    assert (r.new, r.rejected, r.duplicate) == (1, 1, 2)
    assert len(jobs(conn)) == 2


def test_rejects_are_recorded_once_with_the_reason(conn, config):
    bad_text = msg("t", text="x" * 20_000)
    no_id = human(entity="nobody")
    del no_id["id"]
    batch = [msg("u", entity="nobody"), msg("d", entity="off"), bad_text, no_id, [1, 2, 3], "junk"]
    r = ingest(conn, "chat", batch, config)
    assert r.rejected == 6 and r.new == 0
    rows = {j["source_message_id"]: j for j in jobs(conn)}
    assert all(j["state"] == "rejected" and j["model"] is None for j in rows.values())
    assert "unknown entity" in rows["u"]["reason"] and "disabled" in rows["d"]["reason"]
    assert "text: longer than 10000" in rows["t"]["reason"]
    synthetic = [k for k in rows if k.startswith("raw-")]
    assert len(synthetic) == 3
    assert any("expected a JSON object" in rows[k]["reason"] for k in synthetic)
    # a rejected row keeps a preview of what was received, for the operator
    assert all(isinstance(j["payload"]["raw"], str) for j in rows.values())
    assert ingest(conn, "chat", batch, config).rejected == 0
    assert len(jobs(conn)) == 6


def test_ignored_messages_leave_no_rows(conn, config):
    ai = msg("ai")
    ai["message-type"] = "AI"
    plain = msg("p")
    del plain["botParams"]
    r = ingest(conn, "chat", [ai, plain, msg("done", processed=True)], config, cursor="c")
    assert r.ignored == 3 and jobs(conn) == []
    assert cursor.load(conn, "chat") == "c"    # the cursor still moves past them


def test_bad_priority_is_queued_with_a_warning(conn, config):
    r = ingest(conn, "chat", [msg("p", priority=500)], config)
    (job,) = jobs(conn)
    assert r.new == 1 and job["priority"] == 20
    assert "botParams.priority" in job["payload"]["warnings"][0] and "500" in r.outcomes[0].reason


def test_bad_json_lines_are_rejected_with_the_line_number(conn, config):
    import json

    lines = [json.dumps(msg("ok")), "", "{not json", json.dumps(msg("ok2", entity="bob"))]
    r = ingest(conn, "stdin", parse_lines(lines), config)
    assert (r.new, r.rejected) == (2, 1)
    rejected = [j for j in jobs(conn) if j["state"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["reason"].startswith("line 3: invalid JSON")
    assert [o.label for o in r.outcomes] == ["line 1", "line 3", "line 4"]


def test_a_crash_inside_the_transaction_keeps_neither_jobs_nor_cursor(conn, config, monkeypatch):
    ingest(conn, "chat", [msg("a")], config, cursor="before")

    def crash(c, n):
        raise RuntimeError("power cut after the inserts")

    monkeypatch.setattr(ingest_mod.doorbell, "send_ring", crash)
    with pytest.raises(RuntimeError):
        ingest(conn, "chat", [msg("b"), msg("c")], config, cursor="after")
    assert [j["source_message_id"] for j in jobs(conn)] == ["a"]
    assert cursor.load(conn, "chat") == "before"
    monkeypatch.undo()
    r = ingest(conn, "chat", [msg("b"), msg("c")], config, cursor="after")   # the retry gets them all
    assert r.new == 2 and cursor.load(conn, "chat") == "after"


def test_ingest_inside_a_callers_transaction_commits_with_it(db_url, config):
    with db.connect(db_url) as c:
        c.execute("SELECT 1")                   # the caller's transaction is open
        ingest(c, "chat", [msg("a")], config, cursor="x")
        c.rollback()
        assert cursor.load(c, "chat") is None
        assert c.execute("SELECT count(*) AS n FROM aibot.jobs").fetchone()["n"] == 0


def test_a_new_job_rings_the_doorbell_in_the_same_transaction(conn, config, monkeypatch):
    rung = []
    send_ring = ingest_mod.doorbell.send_ring

    def ring(c, n):
        rung.append((n, c.info.transaction_status))
        return send_ring(c, n)

    monkeypatch.setattr(ingest_mod.doorbell, "send_ring", ring)
    ingest(conn, "chat", [msg("a"), msg("b"), msg("r", entity="nobody")], config)
    ingest(conn, "chat", [msg("r2", entity="nobody")], config)   # nothing runnable: no ring statement
    from psycopg.pq import TransactionStatus

    assert [n for n, _ in rung] == [2, 0]
    # Pipelined: the connection is busy inside the transaction the ingest began, not idle.
    assert all(status != TransactionStatus.IDLE for _, status in rung)


def test_a_statement_failing_after_the_inserts_keeps_neither_jobs_nor_cursor(conn, config, monkeypatch):
    """Postgres skips the rest of the pipeline (COMMIT included) after an error; the transaction is
    rolled back and the connection is usable for the retry."""
    import psycopg

    ingest(conn, "chat", [msg("a")], config, cursor="before")
    monkeypatch.setattr(ingest_mod.cursors, "save", lambda c, source, position: c.execute("SELECT 1 / 0"))
    with pytest.raises(psycopg.errors.DivisionByZero):
        ingest(conn, "chat", [msg("b")], config, cursor="after")
    monkeypatch.undo()
    assert [j["source_message_id"] for j in jobs(conn)] == ["a"]
    assert cursor.load(conn, "chat") == "before"
    assert ingest(conn, "chat", [msg("b")], config, cursor="after").new == 1


def test_jobs_cursor_and_doorbell_take_one_round_trip(db_url, config, monkeypatch):
    """The ingest pipelines its statements (BEGIN, insert, cursor, ring, COMMIT): one exchange with
    Postgres per batch, counted in libpq's protocol trace as the server's ReadyForQuery answers."""
    import tempfile

    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")   # the default broker: rings in SQL
    with db.connect(db_url, autocommit=True) as c, tempfile.TemporaryFile("w+") as trace:
        slots(c, server(c, "s1"), "m1", 2)
        c.pgconn.trace(trace.fileno())
        r = ingest(c, "chat", [msg("a"), msg("b")], config, cursor="1")
        c.pgconn.untrace()
        trace.seek(0)
        exchanges = trace.read().count("ReadyForQuery")
        assert r.new == 2 and len(r.job_ids) == 2
        assert exchanges == 1, f"{exchanges} round trips"
        assert cursor.load(c, "chat") == "1"
        assert c.execute("SELECT count(*) AS n FROM dramatiq.queue").fetchone()["n"] >= 1, "the ring rang"


def test_incoming_wrappers_and_plain_dicts_are_both_accepted(conn, config):
    r = ingest(conn, "inbox", [Incoming(raw=human(), fallback_id="inbox-1"), msg("z")], config)
    assert r.new == 2


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NASTY_TEXT = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=12) | st.sampled_from(
    ["\x00", "a\ud800b", "x" * 10_001, "", " "])
NASTY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | NASTY_TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(NASTY_TEXT, c, max_size=3), max_leaves=10)
MESSAGES = st.fixed_dictionaries({"botParams": st.fixed_dictionaries(
    {"entity": st.sampled_from(["alice", "bob", "nobody"]) | NASTY_TEXT},
    optional={"priority": NASTY, "ais": NASTY_TEXT, "model": NASTY})},
    optional={"id": NASTY, "text": NASTY_TEXT, "username": NASTY, "context": st.lists(NASTY_TEXT, max_size=3),
              "timestamp": NASTY}) | NASTY


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(batch=st.lists(MESSAGES, max_size=4))
def test_arbitrary_input_never_breaks_a_batch(conn, config, batch):
    """One poisonous message (NUL, lone surrogate, huge text) must not fail the insert of its batch,
    or the cursor would never move past it."""
    r = ingest(conn, "fuzz", batch, config, cursor="c")
    assert len(r.outcomes) == len(batch)
    assert cursor.load(conn, "fuzz") == "c"
