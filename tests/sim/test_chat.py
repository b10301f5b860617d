"""The fake chat server (aibot.sim.chat) over real loopback HTTP."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from aibot.sim.chat import FakeChatServer


@pytest.fixture
def chat():
    with FakeChatServer() as server:
        yield server


def test_list_after_returns_newer_messages_oldest_first(chat):
    for i in range(5):
        chat.post_human(f"m{i}", "alice", timestamp=1000 + i, id=f"id{i}")
    body = httpx.get(f"{chat.url}/api/comments", params={"after": 1001, "limit": 2}).json()
    assert [m["id"] for m in body["comments"]] == ["id2", "id3"] and body["hasMore"] is True
    body = httpx.get(f"{chat.url}/api/comments", params={"limit": 2}).json()
    assert [m["id"] for m in body["comments"]] == ["id3", "id4"]   # no `after`: the latest page


def test_array_shape_is_newest_first():
    with FakeChatServer(shape="array") as chat:
        for i in range(3):
            chat.post_human(f"m{i}", "alice", timestamp=10 + i, id=f"id{i}")
        body = httpx.get(f"{chat.url}/api/comments", params={"after": 0, "limit": 10}).json()
        assert [m["id"] for m in body] == ["id2", "id1", "id0"]


def test_post_is_idempotent_on_id(chat):
    reply = {"id": "aibot-1", "text": "hello", "username": "AI", "message-type": "AI", "replyTo": "h1"}
    first = httpx.post(f"{chat.url}/api/comments", json=reply)
    second = httpx.post(f"{chat.url}/api/comments", json=reply)
    assert first.status_code == 200 and first.json()["status"] == "success"
    assert second.status_code == 200 and second.json() == {"id": "aibot-1", "status": "duplicate"}
    assert len(chat.replies()) == 1 and chat.replies_by_reply_to() == {"h1": 1}
    assert chat.stats()["duplicates"] == 1


def test_post_without_text_is_a_400(chat):
    assert httpx.post(f"{chat.url}/api/comments", json={"id": "x"}).status_code == 400
    assert httpx.post(f"{chat.url}/api/comments", content=b"{bad", headers={"Content-Type": "application/json"}
                      ).status_code == 400


def test_patch_marks_processed_and_404s_unknown_ids(chat):
    chat.post_human("hi", "alice", id="h1")
    r = httpx.patch(f"{chat.url}/api/comments/h1", json={"botParams": {"processed": True}})
    assert r.status_code == 200 and chat.message("h1")["botParams"] == {"entity": "alice", "processed": True}
    assert httpx.patch(f"{chat.url}/api/comments/nope", json={"botParams": {"processed": True}}).status_code == 404


def test_bearer_token_is_required_when_configured():
    with FakeChatServer(token="s3cret") as chat:
        assert httpx.get(f"{chat.url}/api/comments").status_code == 401
        ok = httpx.get(f"{chat.url}/api/comments", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and chat.stats()["unauthorized"] == 1


def test_fault_injection_is_deterministic_and_stores_nothing():
    def run() -> list[int]:
        with FakeChatServer(post_failure_rate=0.5, seed=42) as chat, httpx.Client() as client:
            codes = [client.post(f"{chat.url}/api/comments", json={"id": f"r{i}", "text": "t"}).status_code
                     for i in range(20)]
            assert chat.stats()["stored"] == codes.count(200) == len(chat.messages())
            return codes

    codes = run()
    assert 0 < codes.count(500) < 20 and codes == run()


def test_ack_loss_stores_then_fails_and_the_retry_is_a_duplicate():
    with FakeChatServer(post_ack_loss_rate=1.0) as chat:
        r = httpx.post(f"{chat.url}/api/comments", json={"id": "r1", "text": "t", "replyTo": "h"})
        assert r.status_code == 500 and chat.replies_by_reply_to() == {}  # stored as human by default
        chat.set_faults(post_ack_loss_rate=0.0)
        assert httpx.post(f"{chat.url}/api/comments", json={"id": "r1", "text": "t"}).json()["status"] == "duplicate"
        assert len(chat.messages()) == 1


def test_fail_next_posts(chat):
    chat.set_faults(fail_next_posts=2)
    codes = [httpx.post(f"{chat.url}/api/comments", json={"id": f"r{i}", "text": "t"}).status_code for i in range(3)]
    assert codes == [500, 500, 200]


def test_admin_endpoints(chat):
    r = httpx.post(f"{chat.url}/_chat/human", json={"text": "hi", "entity": "alice", "priority": 3})
    assert r.status_code == 200 and r.json()["botParams"]["priority"] == 3
    httpx.post(f"{chat.url}/api/comments", json={"id": "a1", "text": "t", "message-type": "AI", "replyTo": "x"})
    stats = httpx.get(f"{chat.url}/_chat/stats").json()
    assert stats["human"] == 1 and stats["ai"] == 1 and stats["replies_by_reply_to"] == {"x": 1}
    assert httpx.post(f"{chat.url}/_chat/faults", json={"post_failure_rate": 2}).status_code == 400
    httpx.post(f"{chat.url}/_chat/reset")
    assert chat.messages() == []


def test_post_human_without_entity_has_no_bot_params(chat):
    m = chat.post_human("just chatting")
    assert "botParams" not in m and m["message-type"] == "human" and m["id"]


def test_standalone_process_prints_url_and_ready():
    proc = subprocess.Popen([sys.executable, "-m", "aibot.sim.chat", "--port", "0", "--shape", "array"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "READY"
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/_chat/stats").json()["messages"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
