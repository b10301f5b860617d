"""`aibot enqueue` and `aibot bot --once` through the real CLI entry point."""

from __future__ import annotations

import io
import json

import pytest

from aibot.cli import main
from aibot.sim.chat import FakeChatServer
from tests.bot.test_rules import human, write_config


@pytest.fixture
def env(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AIBOT_CONFIG", str(write_config(tmp_path)))
    for var in ("AIBOT_CHAT_API_URL", "AIBOT_CHAT_API_TOKEN", "AIBOT_SETTINGS_FILE", "AIBOT_SINK"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def jobs(conn):
    return conn.execute("SELECT source, source_message_id, state, reason FROM aibot.jobs ORDER BY id").fetchall()


def msg(mid, entity="alice"):
    m = human("hi", entity)
    m["id"] = mid
    return m


def feed(monkeypatch, lines):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))


def test_enqueue_reads_json_lines_and_prints_a_summary(env, conn, monkeypatch, capsys):
    feed(monkeypatch, [json.dumps(msg("a")), "{broken", json.dumps(msg("u", "nobody")), json.dumps({"text": "x"})])
    assert main(["enqueue"]) == 0
    out = capsys.readouterr().out
    assert "1 new, 0 duplicate, 2 rejected, 1 ignored" in out
    assert "line 2: invalid JSON" in out and "unknown entity" in out
    rows = jobs(conn)
    assert [(r["source"], r["state"]) for r in rows] == [("stdin", "queued"), ("stdin", "rejected"),
                                                          ("stdin", "rejected")]
    feed(monkeypatch, [json.dumps(msg("a")), "{broken"])
    assert main(["enqueue"]) == 0
    assert "0 new, 2 duplicate, 0 rejected, 0 ignored" in capsys.readouterr().out
    assert len(jobs(conn)) == 3


def test_enqueue_from_a_file_with_a_source_name(env, conn, capsys):
    path = env / "messages.jsonl"
    path.write_text(json.dumps(msg("f1")) + "\n")
    assert main(["enqueue", "--file", str(path), "--source", "chat"]) == 0
    assert [(r["source"], r["source_message_id"]) for r in jobs(conn)] == [("chat", "f1")]


def test_enqueue_check_writes_nothing(env, conn, monkeypatch, capsys):
    feed(monkeypatch, [json.dumps(msg("a")), json.dumps(msg("u", "nobody"))])
    assert main(["enqueue", "--check"]) == 0
    assert "would be: 1 new, 0 duplicate, 1 rejected" in capsys.readouterr().out
    assert jobs(conn) == []


def test_enqueue_errors_are_clear(env, monkeypatch, capsys):
    assert main(["enqueue", "--file", str(env / "nope.jsonl")]) == 2
    assert "--file: cannot read" in capsys.readouterr().err
    monkeypatch.setenv("AIBOT_CONFIG", str(env / "absent.json"))
    assert main(["enqueue", "--check"]) == 2
    assert "absent.json" in capsys.readouterr().err


def test_bot_once_against_the_chat_api(env, conn, monkeypatch, capsys):
    with FakeChatServer(token="tok-XYZZY") as chat:
        monkeypatch.setenv("AIBOT_CHAT_API_URL", chat.url)
        monkeypatch.setenv("AIBOT_CHAT_API_TOKEN", "tok-XYZZY")
        for i in range(3):
            chat.post_human("q", "alice", id=f"c{i}")
        assert main(["bot", "--once", "--batch-size", "2"]) == 0
        assert "3 new" in capsys.readouterr().out
        chat.post_human("q", "bob", id="c3")
        assert main(["bot", "--once"]) == 0
    assert [r["source_message_id"] for r in jobs(conn)] == ["c0", "c1", "c2", "c3"]


def test_bot_once_exits_nonzero_when_the_source_fails(env, monkeypatch, capsys):
    assert main(["bot", "--once", "--source", "chat", "--chat-url", "http://127.0.0.1:9"]) == 1
    assert "ConnectError" in capsys.readouterr().out


def test_bot_defaults_to_the_inbox_without_a_chat_url(env, conn, capsys):
    from aibot.bot.sources import add_to_inbox

    add_to_inbox(conn, msg("in1"))
    assert main(["bot", "--once"]) == 0
    assert [(r["source"], r["source_message_id"]) for r in jobs(conn)] == [("inbox", "in1")]


def test_bot_rejects_bad_flags(env, capsys):
    assert main(["bot", "--once", "--source", "chat"]) == 2
    assert "AIBOT_CHAT_API_URL" in capsys.readouterr().err
    assert main(["bot", "--once", "--start-at", "tomorrow", "--chat-url", "http://x"]) == 2
    assert "--start-at" in capsys.readouterr().err


def test_enqueue_check_shows_no_priority_for_an_ignored_message(env, monkeypatch, capsys):
    """An ignored message creates no job, so it has no priority (it used to show the default 50)."""
    feed(monkeypatch, [json.dumps({"id": "h1", "username": "ann", "text": "between humans"}), json.dumps(msg("a"))])
    assert main(["enqueue", "--check"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[2]: line.split() for line in out.splitlines()[2:] if line.split()[:1] == ["line"]}
    ignored = rows["h1"]
    assert "ignored" in ignored and "50" not in ignored and ignored[ignored.index("ignored") + 1] == "-"
    assert "new" in rows["a"]


def test_bot_logs_where_it_reads_not_a_repr(env, conn, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="aibot.cli.bot")
    assert main(["bot", "--once"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("bot reading"))
    assert line.startswith("bot reading the aibot.inbox table (100 rows per poll), config ")
    assert " object at 0x" not in line
