"""Stable slots: a split that is still as good as a fresh one stays, so the refresh and the rebalance
(each deciding from its own instant's demand) never undo each other."""

from __future__ import annotations

import pytest

from aibot.cluster import slots, state
from aibot.cluster.placement import ModelShare, keeps, server_targets, split_slots
from aibot.cluster.sizing import GB, Budget, Instance
from tests.support.cluster_rows import server

pytestmark = pytest.mark.timeout(60)


def test_a_covered_split_stays_under_demand_noise():
    # 56 GB, two 15 GB parallel-4 models: 4 slots for two models.
    budget = Budget(memory_bytes=56 * GB, per_request_bytes=3 * GB)
    inst = [Instance("a", 15 * GB, 4), Instance("b", 15 * GB, 4)]
    first = server_targets(budget, inst, {"a": 3, "b": 1})
    assert first == {"a": 3, "b": 1}
    # Demand wobbles from claim to claim; every wobble below is covered as well by the rows there are.
    for noise in ({"a": 2, "b": 1}, {"a": 1, "b": 0}, {"a": 0, "b": 0}, {"a": 3, "b": 0}):
        assert server_targets(budget, inst, noise, current=first) == first, noise
    # Without the current rows, the same wobble moves slots back and forth (what flapped before).
    assert server_targets(budget, inst, {"a": 0, "b": 0}) != first
    # Real need moves them: b's demand is no longer covered.
    assert server_targets(budget, inst, {"a": 0, "b": 3}, current=first) == {"a": 1, "b": 3}


def test_keeps_refuses_a_split_that_leaves_a_model_without_its_first_slot_or_over_parallel():
    shares = [ModelShare("a", 2, 0), ModelShare("b", 2, 0)]
    ideal = split_slots(3, shares)
    assert not keeps({"a": 3, "b": 0}, ideal, shares)      # a above its parallel, b without a slot
    assert not keeps({"a": 1, "b": 1}, ideal, shares)      # a slot left unused
    assert keeps({"a": 1, "b": 2}, ideal, shares) and keeps({"a": 2, "b": 1}, ideal, shares)


def test_rebalances_from_different_instants_do_not_flap_the_rows(conn):
    sid = server(conn, "s", memory_bytes=56 * GB)
    for m in ("a", "b"):
        conn.execute("INSERT INTO aibot.model_instances (server_id, model, size_bytes, parallel) VALUES (%s, %s, %s, 4)",
                     (sid, m, 15 * GB))
    first = slots.rebalance(conn, {"a": 3, "b": 1})
    assert {d.model: d.after for d in first} == {"a": 3, "b": 1}
    for demand in ({"a": 0, "b": 0}, {"a": 1}, {"b": 1}, {}, {"a": 3, "b": 1}):
        assert slots.rebalance(conn, demand) == [], demand
    counts = {c["model"]: c["free"] + c["held"] for c in state.slot_counts(conn, sid)}
    assert counts == {"a": 3, "b": 1}


def test_a_rebalance_with_nothing_to_change_locks_no_slot_row(db_url):
    """A completion frees its slot with an UPDATE of the row: a rebalance holding the server's rows
    locked would make it wait, and a claim would skip them. In the steady state (rows already at the
    target) the rebalance only reads; when rows must change it still locks them."""
    import psycopg

    from aibot import db

    with db.connect(db_url, autocommit=True) as setup:
        sid = server(setup, "s", memory_bytes=56 * GB)
        setup.execute("INSERT INTO aibot.model_instances (server_id, model, size_bytes, parallel) "
                      "VALUES (%s, 'a', %s, 2)", (sid, 15 * GB))
        assert slots.rebalance(setup, {"a": 2}) != []          # the rows are made: now at the target
    with db.connect(db_url) as rebalancer, db.connect(db_url, autocommit=True) as completion:
        assert slots.rebalance(rebalancer, {"a": 2}) == []      # its transaction stays open
        row = completion.execute("SELECT id FROM aibot.slots WHERE server_id = %s FOR UPDATE NOWAIT LIMIT 1",
                                 (sid,)).fetchone()
        assert row is not None, "a steady-state rebalance left the slot rows locked"
        rebalancer.rollback()
        completion.execute("UPDATE aibot.model_instances SET parallel = 1 WHERE server_id = %s", (sid,))
        assert slots.rebalance(rebalancer, {"a": 2}) != []      # one row too many: it must change
        with pytest.raises(psycopg.errors.LockNotAvailable):
            completion.execute("SELECT id FROM aibot.slots WHERE server_id = %s FOR UPDATE NOWAIT", (sid,))
        rebalancer.rollback()
