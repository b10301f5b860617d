"""Sources: the chat API (against FakeChatServer), the Postgres inbox, JSON lines."""

from __future__ import annotations

import json

import pytest

from aibot.bot import cursor
from aibot.bot.ingest import ingest
from aibot.bot.sources import (
    ChatSource,
    InboxSource,
    SourceError,
    add_to_inbox,
    parse_chat_position,
    parse_lines,
    plan_chat_page,
)
from aibot.config import load_config
from aibot.sim.chat import FakeChatServer
from tests.bot.test_rules import human, write_config


@pytest.fixture
def config(tmp_path):
    return load_config(write_config(tmp_path))


def ids(batch):
    return [m.raw["id"] for m in batch.messages]


def drain(source, conn=None, position=None, max_polls=50):
    """Polls like the loop does (saving positions in memory); returns every id seen, in order."""
    seen = []
    for _ in range(max_polls):
        batch = source.poll(conn, position)
        seen += ids(batch)
        if batch.position is not None:
            position = batch.position
        if not batch.more:
            return seen, position
    raise AssertionError("source never ran dry")


# --- pure page planning ---------------------------------------------------------------------------

def test_plan_sorts_by_timestamp_then_id_and_skips_what_was_read():
    items = [{"id": "c", "timestamp": 7}, {"id": "a", "timestamp": 5}, {"id": "b", "timestamp": 7},
             {"id": "old", "timestamp": 4}]
    fresh, ts, seen = plan_chat_page(items, 5, ["a"])
    assert [m["id"] for m in fresh] == ["b", "c"] and (ts, seen) == (7, ["b", "c"])


def test_plan_keeps_the_boundary_ids_when_the_timestamp_does_not_move():
    fresh, ts, seen = plan_chat_page([{"id": "x", "timestamp": 5}, {"id": "y", "timestamp": 5}], 5, ["x"])
    assert [m["id"] for m in fresh] == ["y"] and (ts, seen) == (5, ["x", "y"])


def test_plan_passes_malformed_items_through_for_the_rules_to_reject():
    fresh, ts, _ = plan_chat_page(["junk", {"id": "n", "timestamp": "soon"}, {"id": "ok", "timestamp": 9}], 0, [])
    assert len(fresh) == 3 and ts == 9


def test_positions():
    assert parse_chat_position(None, 123) == (123, [])
    assert parse_chat_position("456", 0) == (456, [])        # set by hand
    assert parse_chat_position('{"ts": 7, "ids": ["a"]}', 0) == (7, ["a"])
    with pytest.raises(SourceError, match="chat cursor"):
        parse_chat_position("{garbage", 0)


# --- chat API -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["object", "array"])
def test_chat_source_reads_everything_once_in_order(shape):
    with FakeChatServer(shape=shape) as chat:
        for i in range(7):
            chat.post_human(f"m{i}", "alice", id=f"m{i}", timestamp=1000 + i)
        source = ChatSource(chat.url, limit=3)
        seen, position = drain(source)
        assert seen == [f"m{i}" for i in range(7)]
        chat.post_human("late", "alice", id="m7", timestamp=2000)
        assert drain(source, position=position)[0] == ["m7"]
        assert drain(source, position=position)[0] == ["m7"]   # same position, same answer (no side effects)


@pytest.mark.parametrize("shape", ["object", "array"])
def test_equal_timestamps_at_the_page_boundary_are_not_skipped(shape):
    with FakeChatServer(shape=shape) as chat:
        for name in ("a", "b", "c", "d", "e"):
            chat.post_human(name, "alice", id=name, timestamp=5000)   # all in the same millisecond
        source = ChatSource(chat.url, limit=2)
        seen, position = drain(source)
        assert sorted(seen) == ["a", "b", "c", "d", "e"] and len(seen) == 5
        # one more arrives in that same millisecond after we read it: still picked up, nothing repeated
        chat.post_human("f", "alice", id="f", timestamp=5000)
        assert drain(source, position=position)[0] == ["f"]


def test_chat_source_sends_the_bearer_token_and_never_shows_it():
    with FakeChatServer(token="s3cret") as chat:
        chat.post_human("hi", "alice", id="h")
        assert ids(ChatSource(chat.url, token="s3cret").poll(None, None)) == ["h"]
        bad = ChatSource(chat.url, token="tok-XYZZY")
        with pytest.raises(SourceError) as err:
            bad.poll(None, None)
        assert "401" in str(err.value) and "XYZZY" not in str(err.value) and "XYZZY" not in repr(bad)


def test_chat_source_errors_are_typed():
    with pytest.raises(SourceError, match="ConnectError"):
        ChatSource("http://127.0.0.1:9", timeout=2).poll(None, None)


def test_start_after_skips_history():
    with FakeChatServer() as chat:
        chat.post_human("old", "alice", id="old", timestamp=100)
        chat.post_human("new", "alice", id="new", timestamp=300)
        assert drain(ChatSource(chat.url, start_after_ms=200))[0] == ["new"]


def test_chat_source_with_ingest_is_exactly_once_across_restarts(conn, config):
    with FakeChatServer(shape="array") as chat:
        for i in range(4):
            chat.post_human(f"m{i}", "alice", id=f"m{i}", timestamp=7000)
        for run in range(2):   # a restart = a new source object reading the stored cursor
            source = ChatSource(chat.url, limit=3)
            while True:
                batch = source.poll(conn, cursor.load(conn, "chat"))
                ingest(conn, "chat", batch.messages, config, cursor=batch.position)
                if not batch.more:
                    break
            chat.post_human(f"n{run}", "alice", id=f"n{run}", timestamp=7000)
        rows = conn.execute("SELECT source_message_id FROM aibot.jobs ORDER BY 1").fetchall()
        assert [r["source_message_id"] for r in rows] == ["m0", "m1", "m2", "m3", "n0"]


# --- inbox ----------------------------------------------------------------------------------------

def test_inbox_source_pages_by_row_id(conn):
    for i in range(5):
        add_to_inbox(conn, {"id": f"i{i}", "text": "x"})
    source = InboxSource(limit=2)
    b1 = source.poll(conn, None)
    assert ids(b1) == ["i0", "i1"] and b1.more
    b2 = source.poll(conn, b1.position)
    b3 = source.poll(conn, b2.position)
    assert ids(b2) == ["i2", "i3"] and ids(b3) == ["i4"] and not b3.more
    empty = source.poll(conn, b3.position)
    assert empty.messages == [] and empty.position is None


def test_inbox_rows_without_an_id_use_the_row_id(conn, config):
    m = human()
    del m["id"]
    row = add_to_inbox(conn, m)
    add_to_inbox(conn, "not an object")
    batch = InboxSource().poll(conn, None)
    r = ingest(conn, "inbox", batch.messages, config, cursor=batch.position)
    assert (r.new, r.rejected) == (1, 1)
    assert r.outcomes[0].message_id == f"inbox-{row}"
    assert cursor.load(conn, "inbox") == str(row + 1)


# --- JSON lines -----------------------------------------------------------------------------------

def test_parse_lines():
    items = parse_lines([json.dumps({"a": 1}) + "\n", "\n", "nope\n", "[1]"])
    assert [i.label for i in items] == ["line 1", "line 3", "line 4"]
    assert items[0].raw == {"a": 1} and items[0].error is None
    assert items[1].error.startswith("line 3: invalid JSON") and items[1].fallback_id.startswith("raw-")
    assert parse_lines(["nope"])[0].fallback_id == items[1].fallback_id   # stable: a re-run dedupes
