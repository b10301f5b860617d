"""Worker processes as an operator sees them: SIGTERM, a second SIGTERM, other brokers, log lines."""

from __future__ import annotations

import re
import signal

import pytest

from tests.support.e2e import deployment, entities
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)


def running(d) -> int:
    return d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'running'")


def generating(d, n: int):
    """Posts `n` messages to `n` entities, starts the bot and a worker master, and returns the master
    once all `n` generations are in flight."""
    for i in range(n):
        d.chat.post_human(f"msg {i}", entity=f"e{i + 1}")
    d.stack.start_bot()
    workers = d.stack.start_workers(threads=8)
    wait_for(lambda: running(d) == n, timeout=30, message=f"{n} generations in flight")
    return workers


def test_sigterm_lets_generations_in_flight_finish(db_url, tmp_path):
    # Replies take ~1.5 s; the shutdown timeout (30 s) is ample.
    with deployment(db_url, tmp_path, speed=0.5, preload="all", env={"AIBOT_SHUTDOWN_TIMEOUT": "30"}) as d:
        workers = generating(d, 4)
        workers.signal(signal.SIGTERM)
        assert workers.popen.wait(60) == 0
        assert len(d.chat.replies()) == 4
        assert d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'done'") == 4
        # The bot (still running) has its own row since it registers too; the workers' rows are gone.
        assert d.scalar("SELECT count(*) FROM aibot.workers WHERE role = 'worker'") == 0, \
            "workers unregister on a clean exit"


def test_sigterm_past_the_timeout_releases_jobs_with_their_attempt_refunded(db_url, tmp_path):
    # Replies take ~30 s; the shutdown timeout is 1 s: the jobs go back to the queue.
    with deployment(db_url, tmp_path, speed=10.0, preload="all", env={"AIBOT_SHUTDOWN_TIMEOUT": "1"}) as d:
        workers = generating(d, 3)
        workers.signal(signal.SIGTERM)
        workers.popen.wait(60)
        rows = d.query("SELECT state, attempts FROM aibot.jobs")
        assert rows == [{"state": "queued", "attempts": 0}] * 3, rows
        assert d.chat.replies() == []


def test_second_sigterm_stops_at_once_and_leases_recover(db_url, tmp_path):
    with deployment(db_url, tmp_path, speed=10.0, preload="all",
                    env={"AIBOT_SHUTDOWN_TIMEOUT": "60", "AIBOT_LEASE_SECONDS": "3"}) as d:
        workers = generating(d, 2)
        workers.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in workers.log(), timeout=10)
        workers.signal(signal.SIGTERM)
        workers.popen.wait(15)  # far below the 60 s shutdown timeout
        # The leases (3 s) expire and the scheduler's reclaim puts the jobs back.
        wait_for(lambda: d.scalar("SELECT count(*) FROM aibot.jobs WHERE state = 'queued'") == 2, timeout=30,
                 message="expired leases reclaimed")


@pytest.mark.parametrize("broker_url", ["redis://127.0.0.1:6379/7", "amqp://guest:guest@127.0.0.1:5672/"])
def test_other_brokers_drive_the_same_workers(db_url, tmp_path, broker_url):
    _purge(broker_url)
    with deployment(db_url, tmp_path, preload="all", env={"AIBOT_BROKER_URL": broker_url}) as d:
        posted = [d.chat.post_human(f"hi {i}", entity=f"e{i % 6 + 1}") for i in range(20)]
        d.stack.start_bot()
        d.stack.start_workers(threads=8)
        d.wait_replies(20, timeout=90)
        assert set(d.chat.replies_by_reply_to()) == {m["id"] for m in posted}


def _purge(url: str) -> None:
    """Leftover wake-ups from an earlier run are harmless but make the run less clean."""
    try:
        if url.startswith("redis"):
            import redis

            redis.Redis.from_url(url).flushdb()
        else:
            import pika

            with pika.BlockingConnection(pika.URLParameters(url)) as conn:
                ch = conn.channel()
                for q in ("aibot", "aibot.DQ", "aibot.XQ"):
                    try:
                        ch.queue_purge(q)
                    except Exception:
                        ch = conn.channel()
    except Exception as exc:  # the broker is not running here
        pytest.skip(f"broker {url} unavailable: {exc}")


def test_every_worker_log_line_names_worker_job_entity_server_and_model(db_url, tmp_path):
    with deployment(db_url, tmp_path, ents=entities(2), preload="all") as d:
        for i in range(6):
            d.chat.post_human(f"hi {i}", entity=f"e{i % 2 + 1}")
        d.stack.start_bot()
        workers = d.stack.start_workers(threads=4)
        d.wait_replies(6)

        def delivered_lines():  # the worker logs "delivered" just after the chat server got the reply
            return [line for line in workers.log().splitlines() if "aibot.worker" in line and "delivered" in line]

        wait_for(lambda: len(delivered_lines()) == 6, timeout=10, message="6 'delivered' log lines")
        lines = delivered_lines()
        pattern = re.compile(r"worker=workers:\d+ job=\d+ entity=e[12] server=mac-studio-[12] model=sim/model-[12]@f16 \|")
        for line in lines:
            assert pattern.search(line), line


def test_lines_from_threads_aibot_did_not_start_still_name_the_worker(db_url, tmp_path):
    """psycopg_pool's and Dramatiq's own threads log with an empty context; after a lost session
    (pg_terminate_backend) their lines -- and every ERROR line -- still carry the worker's name."""
    with deployment(db_url, tmp_path, ents=entities(2), preload="all") as d:
        d.chat.post_human("hi", entity="e1")
        d.stack.start_bot()
        workers = d.stack.start_workers(threads=2)
        d.wait_replies(1)
        d.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND application_name = 'aibot'")
        d.chat.post_human("again", entity="e2")
        d.wait_replies(2)
        wait_for(lambda: "psycopg.pool" in workers.log() or "dramatiq_postgres" in workers.log(), timeout=30,
                 message="a line from a library thread about the lost sessions")
        lines = [line for line in workers.log().splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
        library = [line for line in lines if " psycopg.pool " in line or " dramatiq_postgres" in line]
        assert library, lines[-20:]
        # Dramatiq's master (which boots no Runtime) has no worker name; its worker process does.
        unnamed = [line for line in library + [x for x in lines if " ERROR " in x] if "worker=-" in line
                   and "dramatiq.MainProcess" not in line]
        assert unnamed == [], unnamed
        assert "Traceback" not in workers.log(), workers.log()[-4000:]
