"""`aibot worker`: a kill -9'd worker process takes only itself down; its siblings keep claiming and
generating while the supervisor replaces it (the seed's acceptance test 4.1)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from aibot.worker.supervisor import restart_delay
from tests.support.e2e import deployment, entities
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def test_restart_delay_is_immediate_for_a_rare_death_and_grows_in_a_crash_loop():
    assert restart_delay([100.0], 100.0) == 0.0
    assert restart_delay([10.0, 100.0], 100.0) == 0.0, "a death outside the window does not count"
    assert restart_delay([90.0, 100.0], 100.0) == 0.5
    assert restart_delay([80.0, 90.0, 100.0], 100.0) == 1.0
    assert restart_delay([float(t) for t in range(41, 101)], 100.0) == 30.0, "capped"


def _workers(d) -> list[dict]:
    return d.query("SELECT worker_id, pid FROM aibot.workers WHERE role = 'worker' ORDER BY started_at")


def _done_by(d, worker_id: str, since: float) -> int:
    return d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'done' AND worker_id = %s "
                    "AND finished_at > to_timestamp(%s)", (worker_id, since))


def test_a_killed_child_is_replaced_while_its_sibling_keeps_working(db_url, tmp_path):
    with deployment(db_url, tmp_path, ents=entities(2), parallel=(4, 4), preload=["sim/model-1@f16", "sim/model-2@f16"],
                    speed=0.05) as d:
        stop = threading.Event()

        def feed():
            i = 0
            while not stop.is_set():
                d.chat.post_human(f"hello {i}", entity=f"e{i % 2 + 1}", username=f"user{i}")
                i += 1
                stop.wait(0.05)

        feeder = threading.Thread(target=feed, daemon=True)
        d.stack.start_bot()
        sup = d.stack.spawn("workers", [sys.executable, "-m", "aibot", "worker", "--processes", "2", "--threads", "3"],
                            {"AIBOT_WORKER_NAME": "sup"})
        feeder.start()
        try:
            wait_for(lambda: len(_workers(d)) == 2, timeout=60, message="two worker processes registered")
            first = _workers(d)
            wait_for(lambda: all(_done_by(d, w["worker_id"], 0) >= 3 for w in first), timeout=90,
                     message="both processes answering")
            victim, survivor = first
            killed_at = time.time()
            held = d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'running' AND worker_id = %s",
                            (victim["worker_id"],))
            os.kill(victim["pid"], signal.SIGKILL)
            # The supervisor saw it die: its jobs are re-queued by the next reclaim tick, well before
            # their 20 s lease would have run out, and its registration is gone.
            wait_for(lambda: d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'running' AND worker_id = %s",
                                      (victim["worker_id"],)) == 0, timeout=10,
                     message=f"the dead process's {held} job(s) handed back before their lease ran out")
            wait_for(lambda: victim["worker_id"] not in {w["worker_id"] for w in _workers(d)}, timeout=10,
                     message="the dead process unregistered by its supervisor")
            # The survivor goes on answering in the seconds after the kill, with no restart of its own.
            wait_for(lambda: _done_by(d, survivor["worker_id"], killed_at) >= 5, timeout=20,
                     message="the sibling keeps answering after the kill")
            assert survivor["worker_id"] in {w["worker_id"] for w in _workers(d)}, "the sibling was not restarted"
            # The dead one is replaced: a new process registers and answers too.
            wait_for(lambda: any(w["worker_id"] not in {x["worker_id"] for x in first} for w in _workers(d)),
                     timeout=60, message="a replacement worker process registered")
            new = next(w for w in _workers(d) if w["worker_id"] not in {x["worker_id"] for x in first})
            wait_for(lambda: _done_by(d, new["worker_id"], killed_at) >= 1, timeout=60,
                     message="the replacement answers")
            assert sup.alive(), "the supervisor itself kept running"
        finally:
            stop.set()
            feeder.join(5)
        sup.signal(signal.SIGTERM)
        assert sup.popen.wait(60) == 0
        log = sup.log()
        assert "exited (code" in log and "the other 1 keep running" in log, log[-3000:]
        assert "Traceback" not in log, log[-5000:]
        # Every answered message was answered once.
        assert max(d.chat.replies_by_reply_to().values()) == 1
