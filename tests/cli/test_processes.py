"""`aibot bot` and `aibot scheduler` register in `aibot.workers` like workers do (issue 15, finding 3):
they appear under PROCESSES in `aibot status`, in `aibot_workers{role=...}`, and leave on a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from aibot import db
from aibot.harness import entity, write_config
from aibot.web import metrics
from tests.support.waiting import wait_for
from tests.web.test_web import parse_metrics

pytestmark = pytest.mark.timeout(120)


def roles(conn) -> dict[str, dict]:
    return {r["role"]: r for r in conn.execute("SELECT * FROM aibot.workers").fetchall()}


@pytest.fixture
def env(db_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIBOT_")}
    env["AIBOT_DATABASE_URL"] = db_url
    env["AIBOT_CONFIG"] = write_config(tmp_path / "config.json", servers=[],
                                       entities=[entity("eve", "m", rate_limits={})])
    return env


def spawn(env, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aibot", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_bot_and_its_scheduler_show_as_processes(env, conn, db_url, capsys):
    from aibot.cli import main

    bot = spawn(env, "bot", "--source", "inbox")
    try:
        found = wait_for(lambda: (r := roles(conn)).keys() >= {"bot", "scheduler"} and r, timeout=60,
                         message="bot and scheduler rows")
        assert found["bot"]["pid"] == found["scheduler"]["pid"] == bot.pid
        assert found["bot"]["worker_id"].startswith("bot@") and found["scheduler"]["worker_id"].startswith("scheduler@")
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        processes = out[out.index("PROCESSES"):]
        assert found["bot"]["worker_id"] in processes and found["scheduler"]["worker_id"] in processes
        database = db.Database(db_url, max_size=1)
        try:
            samples = {lab["role"]: v for lab, v in
                       parse_metrics(metrics.exposition(database).decode())["aibot_workers"]}
        finally:
            database.close()
        assert samples == {"worker": 0, "bot": 1, "scheduler": 1}
    finally:
        err = stop(bot)
    assert roles(conn) == {}, err


def test_scheduler_alone_registers_and_leaves(env, conn):
    sched = spawn(env, "scheduler")
    try:
        row = wait_for(lambda: roles(conn).get("scheduler"), timeout=60, message="scheduler row")
        assert row["pid"] == sched.pid
    finally:
        err = stop(sched)
    assert roles(conn) == {}, err
