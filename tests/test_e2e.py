"""End to end with real processes: simulated servers, fake chat, `aibot bot` and `dramatiq aibot.actors`."""

from __future__ import annotations

import pytest

from tests.e2e_support import deployment, entities
from tests.waiting import wait_for

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
        assert len(loads) == 6, loads
        assert d.chat.stats()["duplicates"] == 0
