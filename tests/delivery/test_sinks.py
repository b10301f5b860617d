"""Delivery sinks: the chat API (against FakeChatServer), Postgres replies, dry run."""

from __future__ import annotations


import pytest
from pydantic import SecretStr

from aibot.delivery import sinks
from aibot.delivery.sinks import ChatSink, DryRunSink, PostgresSink, SinkError, SinkRejected, make_sink
from aibot.settings import Settings
from aibot.sim.chat import FakeChatServer


def payload(message_id="h1", **extra):
    return {"message_id": message_id, "entity_id": "alice", "entity_username": "Alice",
            "entity_color": "255000000", "ais": None, "domain": "saywhatwant.app",
            **extra}


@pytest.fixture
def chat():
    with FakeChatServer() as server:
        yield server


def test_chat_sink_posts_the_ai_message_and_marks_the_source_processed(chat):
    chat.post_human("hi", "alice", id="h1")
    rid = ChatSink(chat.url).deliver(17, payload(), {"text": "Hello there"})
    assert rid == "aibot-17"
    (reply,) = chat.replies()
    assert {k: reply[k] for k in ("id", "text", "username", "color", "domain", "message-type", "replyTo")} == {
        "id": "aibot-17", "text": "Hello there", "username": "Alice", "color": "255000000",
        "domain": "saywhatwant.app", "message-type": "AI", "replyTo": "h1"}
    assert isinstance(reply["timestamp"], int)
    assert chat.message("h1")["botParams"]["processed"] is True


def test_repeat_delivery_is_a_no_op(chat):
    chat.post_human("hi", "alice", id="h1")
    sink = ChatSink(chat.url)
    assert sink.deliver(5, payload(), {"text": "a"}) == sink.deliver(5, payload(), {"text": "a"}) == "aibot-5"
    assert chat.replies_by_reply_to() == {"h1": 1} and chat.stats()["duplicates"] == 1


def test_ais_identity_is_used(chat):
    ChatSink(chat.url).deliver(1, payload(ais={"name": "Ghost", "color": "010020030"}), {"text": "boo"})
    (reply,) = chat.replies()
    assert (reply["username"], reply["color"]) == ("Ghost", "010020030")


def test_server_errors_raise_a_retryable_sink_error_and_the_retry_succeeds_once(chat):
    chat.post_human("hi", "alice", id="h1")
    chat.set_faults(fail_next_posts=1)
    sink = ChatSink(chat.url)
    with pytest.raises(SinkError) as err:
        sink.deliver(3, payload(), {"text": "x"})
    assert err.value.retryable and "500" in str(err.value)
    assert sink.deliver(3, payload(), {"text": "x"}) == "aibot-3"
    assert chat.replies_by_reply_to() == {"h1": 1}


def test_lost_acknowledgement_then_retry_posts_exactly_once(chat):
    chat.post_human("hi", "alice", id="h1")
    chat.set_faults(post_ack_loss_rate=1.0)
    sink = ChatSink(chat.url)
    with pytest.raises(SinkError):
        sink.deliver(4, payload(), {"text": "x"})
    chat.set_faults(post_ack_loss_rate=0.0)
    sink.deliver(4, payload(), {"text": "x"})
    assert chat.replies_by_reply_to() == {"h1": 1}


def test_connection_refused_is_retryable():
    with pytest.raises(SinkError) as err:
        ChatSink("http://127.0.0.1:9", timeout=2).deliver(1, payload(), {"text": "x"})
    assert err.value.retryable


def test_bad_request_is_not_retryable(chat):
    with pytest.raises(SinkRejected) as err:
        ChatSink(chat.url).deliver(1, payload(), {"text": ""})   # the chat refuses empty text
    assert not err.value.retryable and "400" in str(err.value)
    with pytest.raises(SinkRejected, match="reply.text"):
        ChatSink(chat.url).deliver(1, payload(), {})


def test_patch_404_is_tolerated(chat):
    assert ChatSink(chat.url).deliver(9, payload("gone"), {"text": "x"}) == "aibot-9"
    assert chat.stats()["patch_missing"] == 1 and len(chat.replies()) == 1


def test_bearer_token_is_sent_and_never_shown():
    with FakeChatServer(token="tok-XYZZY") as chat:
        sink = ChatSink(chat.url, token=SecretStr("tok-XYZZY"))
        sink.deliver(1, payload(), {"text": "x"})
        assert len(chat.replies()) == 1 and "XYZZY" not in repr(sink)
        with pytest.raises(SinkRejected) as err:
            ChatSink(chat.url, token="tok-PLUGH").deliver(2, payload(), {"text": "x"})
        assert "401" in str(err.value) and "PLUGH" not in str(err.value)


def test_postgres_sink_is_idempotent(database, conn):
    sink = PostgresSink(database)
    assert sink.deliver(11, payload(), {"text": "one"}) == "aibot-11"
    assert sink.deliver(11, payload(), {"text": "one again"}) == "aibot-11"
    rows = conn.execute("SELECT * FROM aibot.replies").fetchall()
    assert len(rows) == 1
    r = rows[0]
    assert (r["reply_id"], r["job_id"], r["reply_to"], r["entity_id"]) == ("aibot-11", 11, "h1", "alice")
    assert r["message"]["text"] == "one" and r["message"]["message-type"] == "AI"


def test_dry_run_sink_logs(caplog):
    sink = DryRunSink()
    with caplog.at_level("INFO", logger="aibot.delivery.sinks"):
        assert sink.deliver(2, payload(), {"text": "pretend"}) == "aibot-2"
        sink.deliver(2, payload(), {"text": "pretend"})
    assert len(sink.delivered) == 1 and sum("dry run" in r.message for r in caplog.records) == 1


def test_make_sink_chooses_from_settings(monkeypatch, db_url):
    def settings(sink=None, **env):
        environ = {"AIBOT_DATABASE_URL": db_url, **env}
        if sink is not None:
            environ["AIBOT_SINK"] = sink
        return Settings.from_sources(environ)

    with_chat = {"AIBOT_CHAT_API_URL": "http://chat.example"}
    assert isinstance(make_sink(settings(**with_chat)), ChatSink)
    assert isinstance(make_sink(settings()), PostgresSink)
    assert isinstance(make_sink(settings("dry-run", **with_chat)), DryRunSink)
    assert isinstance(make_sink(settings("postgres", **with_chat)), PostgresSink)
    with pytest.raises(ValueError, match="AIBOT_CHAT_API_URL"):
        make_sink(settings("chat"))
    with pytest.raises(ValueError, match="carrier-pigeon"):
        make_sink(settings("carrier-pigeon"))


def test_reply_message_prefers_the_reply_identity():
    m = sinks.reply_message(1, payload(ais={"name": "Ghost", "color": "1"}), {"text": "t", "username": "Own",
                                                                             "color": "002002002"}, now_ms=5)
    assert (m["username"], m["color"], m["timestamp"]) == ("Own", "002002002", 5)
