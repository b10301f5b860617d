"""`aibot status/top/jobs/servers` against real Postgres, and the table renderer."""

from __future__ import annotations

import datetime as dt
import io
import os
import socket
import subprocess
import sys
from urllib.parse import quote

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aibot.cli import main, render
from tests.ops.test_inspection import seed, state_of

SECRET = "hunter2-sup3r-secret"


def with_password(url: str) -> str:
    """The test database URL with a password added (trust auth ignores it; the output must not show it).
    A Unix-socket host (the embedded Postgres) goes in the query string, as libpq's URI form has it."""
    d = conninfo_to_dict(url)
    user, host, port = d.get("user", "postgres"), d.get("host", "127.0.0.1"), d.get("port", 5432)
    if host.startswith("/"):
        return f"postgresql://{user}:{SECRET}@/{d['dbname']}?host={quote(host, safe='')}&port={port}"
    return f"postgresql://{user}:{SECRET}@{host}:{port}/{d['dbname']}"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --- tables ------------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_table_aligns_truncates_and_marks_missing():
    rows = [{"name": "alpha", "n": 3, "note": None}, {"name": "b", "n": 12345, "note": "x" * 100}]
    text = render.to_text(render.table(rows, ["name", "n", render.Column("note", max_width=10)], title="T"))
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["NAME", "N", "NOTE"] and set(lines[2]) == {"-", " "}
    assert lines[3].split() == ["alpha", "3", "-"] and lines[4].split() == ["b", "12345", "xxxxxxxxx…"]
    assert lines[3].index("3") == lines[4].index("12345") + 4, "numbers align right"
    assert all(line == line.rstrip() for line in lines) and "\x1b" not in text
    assert all(ch.isascii() for ch in text.replace("…", ""))


def test_plain_table_empty_markup_and_formatters():
    assert render.to_text(render.table([], ["a"], title="X", empty="(nothing)")) == "X\n  (nothing)\n"
    assert [render.fmt_seconds(s) for s in (0.42, 12, 185, 7800, 90000)] == ["0.4s", "12s", "3m05s", "2h10m", "1d1h"]
    assert render.fmt_bytes(64_000_000_000) == "64.0GB" and render.fmt_bytes(512) == "512B"
    row = [{"t": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "b": True, "s": "a\nb",
            "r": "[SKIP] [bold]x[/bold]"}]
    text = render.to_text(render.table(row, ["t", "b", "s", "r"]))
    assert "yes" in text and "a b" in text and "2024-01-0" in text
    assert "[SKIP] [bold]x[/bold]" in text, "queue text is never read as markup"


def test_terminal_table_has_colour_and_plain_forms_are_chosen(monkeypatch):
    rows = [{"name": "alpha", "status": "healthy"}]
    tty = Terminal()
    monkeypatch.delenv("NO_COLOR", raising=False)
    render.print_(render.table(rows, ["name", "status"]), file=tty)
    assert "\x1b[" in tty.getvalue() and "healthy" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    assert render.is_plain(Terminal())
    monkeypatch.delenv("NO_COLOR")
    assert not render.is_plain(Terminal()) and render.is_plain(io.StringIO())
    render.configure(plain=True)
    try:
        assert render.is_plain(Terminal())
    finally:
        render.configure(plain=False)


def test_live_view_redraws_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = Terminal()
    frames = iter(["first frame", "second frame"])
    assert render.live_loop(lambda: next(frames), interval=0, iterations=2, footer="Ctrl-C to quit", file=tty) == 0
    out = tty.getvalue()
    assert "\x1b[?1049h" in out and "\x1b[?1049l" in out, "the alternate screen, as top uses"
    assert "first frame" in out and "second frame" in out and "Ctrl-C to quit" in out


# --- status / top ------------------------------------------------------------------------------------

def test_status_prints_the_views(conn, db_url, capsys):
    ids = seed(conn)
    code, out, _ = cli(capsys, "status")
    assert code == 0
    assert "QUEUE  queued 4 (runnable 3), running 1, oldest waiting 1m" in out
    section = lambda title: out.split(title, 1)[1].split("\n\n", 1)[0]  # noqa: E731
    servers = section("SERVERS")
    assert "alpha" in servers and "healthy" in servers
    assert "beta" in servers and "down" in servers and "connect refused" in servers
    in_flight = section("IN FLIGHT")
    assert str(ids["running"]) in in_flight and "w1@host:1" in in_flight
    dead = section("DEAD AND REJECTED")
    assert "attempts exhausted" in dead and "entity 'nobody' is unknown" in dead
    dead_ids = {int(line.split()[0]) for line in dead.splitlines()[3:]}
    assert dead_ids == {ids["dead"], ids["rejected"]}
    slots = section("MODELS AND SLOTS")
    assert any(line.split()[:2] == ["alpha", "m1"] and line.split()[-3:] == ["1", "3", "2"] for line in slots.splitlines())
    throughput = section("THROUGHPUT")
    row5 = next(line for line in throughput.splitlines() if line.split()[:1] == ["5"])
    assert row5.split()[1:4] == ["3", "1", "1"]  # replies, skipped, dead in the last 5 minutes


def test_status_redacts_the_database_password(conn, db_url, capsys, monkeypatch):
    seed(conn)
    monkeypatch.setenv("AIBOT_DATABASE_URL", with_password(db_url))
    code, out, err = cli(capsys, "status")
    assert code == 0
    assert SECRET not in out + err
    assert ":***@" in out


def test_unreachable_database_is_one_line_without_password(capsys):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = cli(capsys, "status", "--database-url", f"postgresql://bob:{SECRET}@127.0.0.1:{port}/x")
    assert code == 2
    assert "cannot connect to postgresql://bob:***@127.0.0.1" in err
    assert SECRET not in out + err and "Traceback" not in err


def test_top_when_not_a_terminal_prints_plain_snapshots(conn, db_url, capsys):
    seed(conn)
    code, out, _ = cli(capsys, "top", "--iterations", "3", "--interval", "0")
    assert code == 0
    assert out.count("aibot status") == 3 and "\x1b" not in out


def test_status_via_the_console_entry_point(conn, db_url):
    seed(conn)
    env = {**os.environ, "AIBOT_DATABASE_URL": with_password(db_url)}
    proc = subprocess.run([sys.executable, "-m", "aibot", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SERVERS" in proc.stdout and SECRET not in proc.stdout + proc.stderr


# --- jobs ----------------------------------------------------------------------------------------------

def test_jobs_list_filters(conn, db_url, capsys):
    ids = seed(conn)
    code, out, _ = cli(capsys, "jobs", "list", "--state", "dead")
    assert code == 0
    data = [line.split() for line in out.splitlines()[2:]]
    assert [int(r[0]) for r in data] == [ids["dead"]]
    code, out, _ = cli(capsys, "jobs", "list", "--entity", "zed", "--limit", "10")
    assert {int(line.split()[0]) for line in out.splitlines()[2:]} == {ids["q_high"], ids["dead"]}
    code, out, _ = cli(capsys, "jobs", "list", "--entity", "nobody-at-all")
    assert "(no jobs match)" in out


def test_jobs_show_prints_fields_and_payload(conn, db_url, capsys):
    ids = seed(conn)
    code, out, _ = cli(capsys, "jobs", "show", str(ids["q_crit_old"]))
    assert code == 0
    assert f"id: {ids['q_crit_old']}" in out and "state: queued" in out and '"text": "hello there"' in out


def test_jobs_retry_and_cancel(conn, db_url, capsys):
    ids = seed(conn)
    code, out, _ = cli(capsys, "jobs", "retry", str(ids["dead"]))
    assert code == 0 and f"job {ids['dead']} requeued" in out
    assert state_of(conn, ids["dead"]) == "queued"
    code, out, _ = cli(capsys, "jobs", "cancel", str(ids["q_bg"]), "--reason", "spam")
    assert code == 0 and "cancelled (spam)" in out
    assert state_of(conn, ids["q_bg"]) == "cancelled"


def test_jobs_retry_and_cancel_refuse_running_job(conn, db_url, capsys):
    ids = seed(conn)
    for action in ("retry", "cancel"):
        code, out, err = cli(capsys, "jobs", action, str(ids["running"]))
        assert code != 0
        assert f"job {ids['running']} is running (worker w1@host:1" in err
        assert "Traceback" not in err
    assert state_of(conn, ids["running"]) == "running"
    code, _, err = cli(capsys, "jobs", "retry", "999999")
    assert code == 2 and "job 999999 does not exist" in err


@pytest.mark.parametrize("argv, needle", [
    (["jobs", "list", "--state", "bogus"], "invalid choice: 'bogus'"),
    (["jobs", "retry", "abc"], "invalid int value: 'abc'"),
    (["jobs"], "the following arguments are required"),
    (["servers", "drain"], "the following arguments are required: name"),
    (["top", "--iterations", "0"], "0 must be at least 1"),
])
def test_bad_arguments_give_usage_and_nonzero_exit(capsys, argv, needle):
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert "usage: aibot" in err and needle in err


# --- servers -------------------------------------------------------------------------------------------

def test_servers_list_drain_enable(conn, db_url, capsys):
    seed(conn)
    code, out, _ = cli(capsys, "servers", "list")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[2:]]
    assert names == ["alpha", "beta"]

    code, out, _ = cli(capsys, "servers", "drain", "alpha")
    assert code == 0 and "draining=true" in out
    row = conn.execute("SELECT enabled, draining FROM aibot.servers WHERE name = 'alpha'").fetchone()
    assert row == {"enabled": True, "draining": True}

    conn.execute("UPDATE aibot.servers SET enabled = false WHERE name = 'alpha'")
    code, out, _ = cli(capsys, "servers", "enable", "alpha")
    assert code == 0
    row = conn.execute("SELECT enabled, draining FROM aibot.servers WHERE name = 'alpha'").fetchone()
    assert row == {"enabled": True, "draining": False}

    code, _, err = cli(capsys, "servers", "drain", "gamma")
    assert code == 2 and "server 'gamma' is not known (servers: alpha, beta)" in err


def test_make_conninfo_helper_is_consistent(db_url):
    # guards with_password: the rewritten URL must point at the same database
    assert conninfo_to_dict(make_conninfo(with_password(db_url)))["dbname"] == conninfo_to_dict(db_url)["dbname"]
