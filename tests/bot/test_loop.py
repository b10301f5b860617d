"""The bot loop end to end: chat messages in, job rows out; restarts; failures; prompt stop."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from aibot.bot import loop
from aibot.bot.loop import run_bot
from aibot.bot.sources import Batch, ChatSource, InboxSource, add_to_inbox
from aibot.config import ConfigStore
from aibot.sim.chat import FakeChatServer
from tests.bot.test_rules import write_config
from tests.support.waiting import wait_for

SETTINGS = SimpleNamespace(aging_seconds=30.0, database_url=None)


@pytest.fixture
def store(tmp_path):
    return ConfigStore(write_config(tmp_path))


def job_ids(conn):
    return [r["source_message_id"] for r in
            conn.execute("SELECT source_message_id FROM aibot.jobs ORDER BY source_message_id").fetchall()]


def run_in_thread(**kw):
    stop = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("stats", run_bot(SETTINGS, stop_event=stop, **kw)), daemon=True)
    t.start()
    return stop, t, out


def test_once_turns_chat_messages_into_jobs(conn, database, store):
    with FakeChatServer(shape="array") as chat:
        for i in range(5):
            chat.post_human(f"q{i}", "alice", id=f"m{i}", priority=i)
        chat.post_human("just talking", id="plain")
        chat.post_human("to a ghost", "nobody", id="ghost")
        stats = run_bot(SETTINGS, store, ChatSource(chat.url, limit=2), threading.Event(), database=database,
                        once=True)
    assert (stats.new, stats.rejected, stats.ignored, stats.errors) == (5, 1, 1, 0)
    assert stats.polls >= 4                      # pages of 2 were drained without waiting
    assert job_ids(conn) == ["ghost", "m0", "m1", "m2", "m3", "m4"]
    assert conn.execute("SELECT position FROM aibot.cursors WHERE source = 'chat'").fetchone() is not None


def test_restart_neither_duplicates_nor_skips(conn, database, store):
    with FakeChatServer() as chat:
        for i in range(3):
            chat.post_human(f"q{i}", "alice", id=f"a{i}", timestamp=10_000)
        run_bot(SETTINGS, store, ChatSource(chat.url, limit=2), threading.Event(), database=database, once=True)
        chat.post_human("same ms", "alice", id="a3", timestamp=10_000)
        chat.post_human("later", "bob", id="b0", timestamp=20_000)
        stats = run_bot(SETTINGS, store, ChatSource(chat.url, limit=2), threading.Event(), database=database,
                        once=True)
        again = run_bot(SETTINGS, store, ChatSource(chat.url, limit=2), threading.Event(), database=database,
                        once=True)
    assert stats.new == 2 and stats.duplicate == 0
    assert again.new == 0 and again.duplicate == 0    # nothing re-read: the cursor moved with the jobs
    assert job_ids(conn) == ["a0", "a1", "a2", "a3", "b0"]


def test_inbox_source_end_to_end(conn, database, store):
    for i in range(3):
        add_to_inbox(conn, {"id": f"i{i}", "text": "hey", "botParams": {"entity": "bob"}})
    stats = run_bot(SETTINGS, store, InboxSource(), threading.Event(), database=database, once=True)
    assert stats.new == 3 and job_ids(conn) == ["i0", "i1", "i2"]


class FlakySource:
    """Fails the first `failures` polls, then serves one message."""

    name = "flaky"

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0

    def poll(self, conn, position):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("chat API down")
        if position is None:
            return Batch([{"id": "f1", "text": "hi", "botParams": {"entity": "alice"}}], position="1")
        return Batch()


def test_loop_survives_source_errors_with_backoff(conn, database, store):
    source = FlakySource(failures=3)
    stop, t, out = run_in_thread(config_store=store, source=source, database=database, poll_interval=0.01,
                                 max_backoff=0.02)
    wait_for(lambda: job_ids(conn) == ["f1"], timeout=10, message="the job after the source recovered")
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive()
    assert out["stats"].errors == 3 and "chat API down" in out["stats"].last_error


def test_loop_survives_a_bad_config_and_database_errors(conn, database, tmp_path):
    broken = ConfigStore(tmp_path / "missing.json")       # first get() raises: no good config yet
    stop, t, out = run_in_thread(config_store=broken, source=FlakySource(0), database=database, poll_interval=0.01,
                                 max_backoff=0.02)
    wait_for(lambda: t.is_alive() and broken.last_error is not None, timeout=5)
    write_config(tmp_path).rename(tmp_path / "missing.json")
    wait_for(lambda: job_ids(conn) == ["f1"], timeout=10, message="the job once the config appeared")
    stop.set()
    t.join(timeout=5)
    assert out["stats"].errors >= 1


def test_stop_event_interrupts_the_wait_promptly(database, store):
    source = FlakySource(0)
    stop, t, out = run_in_thread(config_store=store, source=source, database=database, poll_interval=60)
    wait_for(lambda: source.calls >= 1, timeout=5)
    started = time.monotonic()
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive() and time.monotonic() - started < 2
    assert out["stats"].polls == 1


def test_once_reports_an_error_instead_of_retrying(database, store):
    stats = run_bot(SETTINGS, store, FlakySource(1), threading.Event(), database=database, once=True)
    assert stats.errors == 1 and stats.polls == 0


def test_poll_interval_comes_from_the_config_unless_overridden(tmp_path):
    cfg = ConfigStore(write_config(tmp_path)).get()
    assert loop.poll_interval_seconds(cfg) == 0.05           # botSettings.pollingInterval = 50 ms
    assert loop.poll_interval_seconds(cfg, 2.5) == 2.5
    assert loop.poll_interval_seconds(None) == loop.DEFAULT_POLL_SECONDS


def test_backoff_doubles_and_caps():
    assert [loop.backoff_seconds(n, cap=10) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
