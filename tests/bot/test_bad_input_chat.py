"""Hostile chat messages through the real path: the fake chat server over HTTP, the bot's chat source,
rules and ingest, into Postgres.

Every message must end as ignored, rejected (a row whose reason names the field) or a job; none may
stop the poll or affect the valid message posted beside it, whose text must round-trip exactly
(unicode, SQL-looking strings and all).
"""

from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibot.bot.loop import run_bot
from aibot.bot.rules import is_storable
from aibot.bot.sources import ChatSource
from aibot.config import ConfigStore
from aibot.settings import Settings
from aibot.sim.chat import FakeChatServer
from tests.bot.test_rules import write_config

pytestmark = pytest.mark.timeout(300)

SQLISH = ["'); DROP TABLE aibot.jobs; --", "Robert'); DELETE FROM aibot.jobs WHERE ('1'='1",
          "%(text)s", "%s %s", "$1", "\\x00", "' OR 1=1 --", "\"; SELECT pg_sleep(10); --"]
UNICODE = ["héllo wörld", "🤖🔥" * 20, "مرحبا بالعالم", "z\u0301\u0301\u0301", "\u202eevil", "日本語のテキスト", "\ufeffbom"]
TEXT = st.sampled_from(SQLISH + UNICODE) | st.text(min_size=1, max_size=80)
ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)
BAD_COLOR = st.sampled_from(["999999999", "red", "#ff0000", "12345678", "255255256", "", 195080200, None, []])
BAD_PRIORITY = st.sampled_from([-1, 100, 10**9, "high", "7.5", 7.5, True, None, [], {"p": 1}, float("nan")])
ENTITY = st.sampled_from(["alice", "bob", "nobody", "", "ALICE", "alice; DROP TABLE aibot.jobs"]) | TEXT | ANY


@st.composite
def hostile_message(draw):
    """A message as a broken or malicious client might post it."""
    kind = draw(st.sampled_from(["not_object", "fields", "huge", "colour", "priority"]))
    if kind == "not_object":
        return draw(st.lists(ANY, max_size=2) | TEXT | st.integers() | st.none())
    msg = {"text": draw(TEXT), "username": draw(TEXT), "color": "195080200", "message-type": "human",
           "botParams": {"entity": draw(ENTITY)}}
    if kind == "fields":
        for key in draw(st.lists(st.sampled_from(["text", "username", "color", "timestamp", "context", "domain",
                                                  "botParams", "message-type"]), max_size=3, unique=True)):
            if draw(st.booleans()):
                msg.pop(key, None)
            else:
                msg[key] = draw(ANY)
        if isinstance(msg.get("botParams"), dict):
            msg["botParams"].update(draw(st.dictionaries(st.sampled_from(["ais", "model", "processed", "priority"]),
                                                         ANY, max_size=2)))
    elif kind == "huge":
        msg["text"] = draw(st.sampled_from(["x" * 10_001, "🤖" * 10_001, "a\n" * 6000]))
    elif kind == "colour":
        msg["color"] = draw(BAD_COLOR)
        msg["botParams"]["ais"] = f"Bot:{draw(BAD_COLOR)}"
    else:
        msg["botParams"]["priority"] = draw(BAD_PRIORITY)
    return msg


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return str(write_config(tmp_path_factory.mktemp("cfg")))


_ids = itertools.count()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(hostile=st.lists(hostile_message(), min_size=1, max_size=5), control_text=TEXT, position=st.integers(0, 5))
def test_hostile_messages_never_stop_the_bot_or_touch_the_good_one(conn, database, config_path, hostile,
                                                                   control_text, position):
    if not control_text.strip() or not is_storable(control_text):
        control_text = "plain control"
    n = next(_ids)
    control_id = f"control-{n}"
    with FakeChatServer() as chat:
        items = list(hostile)
        items.insert(min(position, len(items)), None)   # where the control message goes
        ts = 1_700_000_000_000
        for i, item in enumerate(items):
            if item is None:
                chat.post_human(control_text, entity="alice", id=control_id, timestamp=ts + i, priority=3)
            else:
                chat.add_raw(item, timestamp=ts + i)
        source = ChatSource(chat.url, name=f"fuzz-{n}", limit=2)   # small pages: poison on page boundaries too
        try:
            stats = run_bot(Settings(database_url=database.url), ConfigStore(config_path), source,
                            threading.Event(), database=database, once=True)
        finally:
            source.close()
    assert stats.errors == 0, stats.last_error
    outcomes = [o for r in stats.results for o in r.outcomes]
    # Items without a usable timestamp cannot move the cursor, so they may be read again: as duplicates.
    assert len({o.message_id for o in outcomes}) == len({o.message_id for o in outcomes if o.status != "duplicate"})
    assert len(outcomes) >= len(items), "every listed item gets a decision"
    rows = conn.execute("SELECT source_message_id, entity_id, state, reason, payload, priority FROM aibot.jobs "
                        "WHERE source = %s", (f"fuzz-{n}",)).fetchall()
    control = [r for r in rows if r["source_message_id"] == control_id]
    assert len(control) == 1 and control[0]["state"] == "queued", control
    assert control[0]["payload"]["text"] == control_text, "the text must round-trip unchanged"
    assert control[0]["priority"] == 3 and control[0]["entity_id"] == "alice"
    for r in rows:
        assert r["state"] in ("queued", "rejected"), r
        if r["state"] == "rejected":
            assert r["reason"] and ":" in r["reason"], f"a reject must name the field: {r['reason']!r}"
    assert len(rows) == sum(1 for o in outcomes if o.status in ("new", "rejected"))


def test_sql_looking_text_and_ids_round_trip_and_the_schema_survives(conn, database, config_path):
    with FakeChatServer() as chat:
        for i, text in enumerate(SQLISH + UNICODE):
            chat.post_human(text, entity="alice", id=f"{text[:40]}-{i}", username=text[:64], timestamp=1_700_000_000_000 + i)
        source = ChatSource(chat.url, name="sqlish")
        try:
            stats = run_bot(Settings(database_url=database.url), ConfigStore(config_path), source,
                            threading.Event(), database=database, once=True)
        finally:
            source.close()
    assert stats.errors == 0, stats.last_error
    rows = conn.execute("SELECT source_message_id, payload FROM aibot.jobs WHERE source = 'sqlish' ORDER BY id").fetchall()
    got = {r["source_message_id"]: r["payload"]["text"] for r in rows}
    want = {f"{t[:40]}-{i}": t for i, t in enumerate(SQLISH + UNICODE)}
    assert got == want
    assert conn.execute("SELECT to_regclass('aibot.jobs') IS NOT NULL AS ok").fetchone()["ok"]
