"""Crash, restart and fault injection against real processes (see docs/reliability.md).

`test_chaos_short` is the CI variant (~150 messages, 1-2 minutes; `AIBOT_CHAOS_MESSAGES` resizes it).
`test_chaos_long` (500 messages, a 20 s outage) is marked slow and runs only with `AIBOT_CHAOS_LONG=1`;
`bench/chaos.py` runs the same and writes bench/results/chaos.json.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from tests.chaos.harness import ChaosConfig, ChaosRun, local_cluster_restartable
from tests.chaos.schedule import (EVENT_KINDS, KILL_WORKER, RESTART_POSTGRES, SERVER_OUTAGE, TRACEBACK, Observed,
                                  count_tracebacks, make_schedule, overlapping_loads, sink_repeats, verdict)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# --- the schedule (pure) ---------------------------------------------------------------------------


def test_schedule_is_seeded_and_complete():
    a = make_schedule(7, duration=40, servers=["s1", "s2"], outage_seconds=8)
    assert a == make_schedule(7, duration=40, servers=["s1", "s2"], outage_seconds=8)
    assert a != make_schedule(8, duration=40, servers=["s1", "s2"], outage_seconds=8)
    kinds = [e.kind for e in a]
    assert sorted(set(kinds)) == sorted(EVENT_KINDS)
    assert kinds.count(KILL_WORKER) == 3
    assert [e.at for e in a] == sorted(e.at for e in a) and len({e.at for e in a}) == len(a)
    assert all(4 <= e.at <= 36 for e in a)
    outage = next(e for e in a if e.kind == SERVER_OUTAGE)
    assert outage.target in ("s1", "s2") and outage.seconds == 8
    assert outage.at + outage.seconds < 40, "the outage must end while traffic still flows"
    assert {e.target for e in a if e.kind in ("kill_worker", "kill_master", "term_master")} == {"a", "b"}


def test_schedule_without_postgres_restart_and_bad_arguments():
    kinds = [e.kind for e in make_schedule(1, duration=10, servers=["s"], outage_seconds=1, pg_restarts=0)]
    assert RESTART_POSTGRES not in kinds
    with pytest.raises(ValueError, match="duration"):
        make_schedule(1, duration=0, servers=["s"], outage_seconds=1)
    with pytest.raises(ValueError, match="servers"):
        make_schedule(1, duration=10, servers=[], outage_seconds=1)


# --- the verdict (pure) ------------------------------------------------------------------------------


def observed(**kw) -> Observed:
    base = dict(
        messages=[{"id": "m1", "expect": "answer"}, {"id": "m2", "expect": "answer"}, {"id": "m3", "expect": "reject"}],
        replies_by_reply_to={"m1": 1},
        jobs=[{"source_message_id": "m1", "state": "done", "reason": None},
              {"source_message_id": "m2", "state": "dead", "reason": "attempts exhausted (3/3)"},
              {"source_message_id": "m3", "state": "rejected", "reason": "botParams.entity: unknown entity"}],
        max_lease_overdue=1.0, lease_margin=10.0, peaks=[("s1", "m", 1, 1)], loaded_instances=[("s1", "m", 1)],
        loads=[])
    base.update(kw)
    return Observed(**base)


def test_verdict_accepts_a_run_that_kept_every_promise():
    counts, violations = verdict(observed())
    assert violations == []
    assert counts["answered_once"] == 1 and counts["dead"] == 1 and counts["rejected"] == 1
    assert counts["messages"] == 3 and counts["replies"] == 1


@pytest.mark.parametrize("change, expected", [
    ({"replies_by_reply_to": {"m1": 2}}, "answered 2 times"),
    ({"replies_by_reply_to": {}}, "reply lost"),
    ({"replies_by_reply_to": {"m1": 1, "m2": 1}}, "job dead but a reply was posted"),
    ({"replies_by_reply_to": {"m1": 1, "zz": 1}}, "nobody asked for"),
    ({"max_lease_overdue": 30.0}, "past its lease"),
    ({"peaks": [("s1", "m", 2, 1)]}, "generations at once > parallel 1"),
    ({"loaded_instances": [("s1", "m", 2)]}, "duplicate load"),
    ({"left_running_after_term": [{"id": 5, "worker_id": "w:1"}]}, "left job 5 running"),
    ({"post_log": [{"id": "aibot-1", "text": "a", "timestamp": 1, "outcome": "stored"},
                   {"id": "aibot-1", "text": "b", "timestamp": 2, "outcome": "duplicate"}]}, "regenerated"),
    ({"tracebacks": {"worker-a1": 2}}, "2 unhandled traceback(s) in the log of worker-a1"),
])
def test_verdict_catches_each_broken_promise(change, expected):
    _, violations = verdict(observed(**change))
    assert any(expected in v for v in violations), violations


def test_verdict_catches_missing_unfinished_reasonless_and_misjudged_jobs():
    jobs = [{"source_message_id": "m1", "state": "running", "reason": None},
            {"source_message_id": "m2", "state": "dead", "reason": ""},
            {"source_message_id": "m3", "state": "done", "reason": None}]
    _, violations = verdict(observed(jobs=jobs, replies_by_reply_to={"m3": 1}))
    text = "\n".join(violations)
    assert "m1: job still running" in text
    assert "m2: job dead without a reason" in text
    assert "m3: bad input ended done" in text
    _, violations = verdict(observed(jobs=jobs[1:]))
    assert any("m1: 0 job rows" in v for v in violations)


def test_a_non_deduplicating_sink_counts_repeats_and_tells_re_sent_from_regenerated():
    log = [{"id": "aibot-1", "text": "hi", "timestamp": 1, "outcome": "failed"},
           {"id": "aibot-1", "text": "hi", "timestamp": 1, "outcome": "stored"},
           {"id": "aibot-1", "text": "hi", "timestamp": 1, "outcome": "duplicate"},   # lost ack, re-sent
           {"id": "aibot-2", "text": "yo", "timestamp": 5, "outcome": "stored"}]
    assert sink_repeats(log) == {"posts": 4, "kept": 3, "duplicates": 1, "regenerations": 0, "regenerated_ids": []}
    again = log + [{"id": "aibot-2", "text": "yo", "timestamp": 9, "outcome": "duplicate"}]  # generated anew
    assert sink_repeats(again)["regenerations"] == 1 and sink_repeats(again)["regenerated_ids"] == ["aibot-2"]
    assert count_tracebacks({"a": "ok", "b": f"x\n{TRACEBACK}:\n  ...\n{TRACEBACK}:"}) == {"b": 2}


def test_overlapping_loads_only_compares_finished_intervals():
    def load(start, end):
        return {"server_id": 1, "model": "m", "started_at": T0 + timedelta(seconds=start),
                "finished_at": None if end is None else T0 + timedelta(seconds=end)}
    assert overlapping_loads([load(0, 5), load(6, 8)]) == []
    assert len(overlapping_loads([load(0, 5), load(3, 8)])) == 1
    assert overlapping_loads([load(0, None), load(3, 8)]) == []   # abandoned: the simulator decides
    assert overlapping_loads([load(0, 5), {**load(3, 8), "model": "other"}]) == []


# --- the runs ------------------------------------------------------------------------------------------


def _run(db_url, tmp_path, cfg: ChaosConfig):
    result = ChaosRun(db_url, tmp_path, cfg).run()
    print("\n" + result.summary())
    assert not result.errors, "\n".join(result.errors)
    assert not result.violations, "\n".join(result.violations)
    assert result.counts["answered_once"] + result.counts.get("dead", 0) + result.counts.get("rejected", 0) \
        + result.counts.get("skipped", 0) == result.counts["messages"]
    assert result.counts["answered_once"] > 0.8 * result.counts["messages"], "most messages should be answered"
    executed = {e["kind"] for e in result.events if "skipped" not in e["detail"]}
    assert {KILL_WORKER, "kill_master", "term_master", "terminate_backends", SERVER_OUTAGE} <= executed, executed
    if cfg.pg_restart or (cfg.pg_restart is None and local_cluster_restartable(db_url)):
        assert RESTART_POSTGRES in executed
    return result


@pytest.mark.timeout(400)
def test_chaos_short(db_url, tmp_path):
    messages = int(os.environ.get("AIBOT_CHAOS_MESSAGES", "150"))
    _run(db_url, tmp_path, ChaosConfig(messages=messages, seed=int(os.environ.get("AIBOT_CHAOS_SEED", "1")),
                                       feed_seconds=max(20.0, messages * 0.27)))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(os.environ.get("AIBOT_CHAOS_LONG") != "1", reason="long chaos run: set AIBOT_CHAOS_LONG=1 "
                                                                      "(or run bench/chaos.py)")
def test_chaos_long(db_url, tmp_path):
    _run(db_url, tmp_path, ChaosConfig(messages=500, seed=2, feed_seconds=120, outage_seconds=20, worker_kills=5,
                                       master_kills=2, terms=2, backend_kills=2, quiesce_timeout=300))
