"""End to end with real processes: simulated servers, fake chat, `aibot bot` and `dramatiq aibot.actors`."""

from __future__ import annotations

import pytest

from tests.support.e2e import deployment, entities
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def test_200_messages_6_entities_2_servers_each_answered_once(db_url, tmp_path):
    with deployment(db_url, tmp_path) as d:
        posted = [d.chat.post_human(f"hello {i}", entity=f"e{i % 6 + 1}", priority=i % 100, username=f"user{i}")
                  for i in range(200)]
        d.stack.start_bot()
        d.stack.start_workers(threads=16)
        d.wait_replies(200, timeout=180)
        by_reply_to = d.chat.replies_by_reply_to()
        assert set(by_reply_to) == {m["id"] for m in posted}
        assert max(by_reply_to.values()) == 1, "a message was answered twice"
        human_entity = {m["id"]: m["botParams"]["entity"] for m in posted}
        for reply in d.chat.replies():
            assert reply["message-type"] == "AI"
            assert reply["username"] == human_entity[reply["replyTo"]], "reply posted as the wrong entity"
        wait_for(lambda: d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'done'") == 200, timeout=30)
        for server, model, peak, parallel in d.peak_vs_parallel():
            assert peak <= parallel, f"{server}/{model}: {peak} in flight > {parallel} slots"
        loads = d.query("SELECT server_id, model, started_at, finished_at, worker_id, reason FROM aibot.model_loads "
                        "WHERE action = 'load' AND ok ORDER BY model")
        assert len({r["model"] for r in loads}) == 6, loads
        # Single-flight: a model is loaded at most once per server (a second server's copy is a replica
        # the demand pass chose for the backlog, docs/cluster.md), never twice on one.
        assert len(loads) == len({(r["server_id"], r["model"]) for r in loads}), loads
        assert d.chat.stats()["duplicates"] == 0


def test_backlog_is_served_in_priority_order(db_url, tmp_path):
    """One slot, a backlog queued before any worker runs: claims follow priority, FIFO within one."""
    with deployment(db_url, tmp_path, ents=entities(1), servers=1, parallel=(1,), preload=["sim/model-1@f16"]) as d:
        priorities = [37, 5, 80, 5, 0, 99, 12, 37, 61, 0, 25, 90, 5, 44, 3]
        for i, p in enumerate(priorities):
            d.chat.post_human(f"msg {i}", entity="e1", priority=p)
        d.stack.start_bot()
        wait_for(lambda: d.scalar("SELECT count(*) FROM aibot.jobs") == len(priorities), timeout=30)
        d.stack.start_workers(threads=4)
        d.wait_replies(len(priorities))
        order = d.query("SELECT priority, id FROM aibot.jobs ORDER BY claimed_at, id")
        assert [(r["priority"], r["id"]) for r in order] == sorted((r["priority"], r["id"]) for r in order)
        assert [r["priority"] for r in order][:3] == [0, 0, 3]


def test_rate_limits_defer_and_never_drop(db_url, tmp_path):
    limits = {"minSecondsBetweenPosts": 0, "maxPostsPerMinute": 4, "maxPostsPerHour": 100}
    with deployment(db_url, tmp_path, ents=entities(1, rate_limits=limits), preload="all") as d:
        for i in range(10):
            d.chat.post_human(f"msg {i}", entity="e1")
        d.stack.start_bot()
        d.stack.start_workers(threads=8)
        # Every job is either answered or deferred past the one-minute window, none dropped.
        wait_for(lambda: d.scalar(
            "SELECT count(*) FROM aibot.jobs WHERE state = 'done' OR (state = 'queued' AND available_at > now())") == 10,
            timeout=60, message="4 answered and 6 deferred")
        assert len(d.chat.replies()) == 4
        assert d.scalar("SELECT count(*) FROM aibot.rate_events WHERE entity_id = 'e1'") == 4
        assert d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'queued' AND attempts = 0") == 6, \
            "a rate-limit deferral must not burn an attempt"


def test_bot_restart_neither_reanswers_nor_skips(db_url, tmp_path):
    with deployment(db_url, tmp_path, preload="all") as d:
        first = [d.chat.post_human(f"first {i}", entity=f"e{i % 6 + 1}") for i in range(40)]
        bot = d.stack.start_bot()
        d.stack.start_workers(threads=8)
        d.wait_replies(10)
        assert bot.stop() == 0
        second = [d.chat.post_human(f"second {i}", entity=f"e{i % 6 + 1}") for i in range(40)]
        d.stack.start_bot(name="bot-restarted")
        d.wait_replies(80)
        counts = d.chat.replies_by_reply_to()
        assert set(counts) == {m["id"] for m in first + second}
        assert set(counts.values()) == {1}
        assert d.scalar("SELECT count(*) FROM aibot.jobs") == 80


def test_two_worker_hosts_never_overcommit_slots(db_url, tmp_path):
    with deployment(db_url, tmp_path, preload="all") as d:
        for i in range(150):
            d.chat.post_human(f"hi {i}", entity=f"e{i % 6 + 1}")
        d.stack.start_workers("host-a", threads=8)
        d.stack.start_workers("host-b", threads=8)
        # Both hosts are consuming before the first wake-up, so both race for the work.
        wait_for(lambda: d.scalar("SELECT count(DISTINCT split_part(worker_id, ':', 1)) FROM aibot.workers") == 2,
                 timeout=30, message="both worker hosts registered")
        d.stack.start_bot()
        d.wait_replies(150)
        assert set(d.chat.replies_by_reply_to().values()) == {1}
        for server, model, peak, parallel in d.peak_vs_parallel():
            assert peak <= parallel, f"{server}/{model}: {peak} in flight > {parallel} slots"
        hosts = {r["host"] for r in d.query(
            "SELECT split_part(worker_id, ':', 1) AS host FROM aibot.jobs WHERE state = 'done'")}
        assert hosts == {"host-a", "host-b"}, "both worker hosts should have taken work"
