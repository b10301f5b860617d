import threading
from datetime import datetime, timedelta, timezone

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from aibot import scheduler
from aibot.scheduler import Schedule, Scheduler, parse_schedule, tick_time
from tests.waiting import wait_for


def test_parse_schedule_forms():
    assert isinstance(parse_schedule("10s"), IntervalTrigger)
    assert parse_schedule("5m").interval == timedelta(minutes=5)
    assert parse_schedule("250ms").interval == timedelta(milliseconds=250)
    assert isinstance(parse_schedule("*/5 * * * *"), CronTrigger)
    assert parse_schedule("off") is None
    with pytest.raises(ValueError, match="'every tuesday'"):
        parse_schedule("every tuesday")
    with pytest.raises(ValueError, match="bad cron"):
        parse_schedule("61 * * * *")


def test_tick_time_is_the_same_for_late_and_early_runs():
    trigger = parse_schedule("10s")
    base = datetime(2026, 1, 1, 12, 0, 10, tzinfo=timezone.utc)
    assert tick_time(trigger, base) == base
    assert tick_time(trigger, base + timedelta(seconds=2.5)) == base  # a late wake-up
    assert tick_time(trigger, base - timedelta(milliseconds=300)) == base  # a fast clock
    cron = parse_schedule("*/5 * * * *")
    at = datetime(2026, 1, 1, 12, 5, 0, tzinfo=timezone.utc)
    assert tick_time(cron, at + timedelta(seconds=3)) == at


def test_two_schedulers_run_each_tick_once(database):
    runs = []
    lock = threading.Lock()

    def task(_db):
        with lock:
            runs.append(threading.current_thread().name)

    sched = [Schedule("probe-test", "200ms", task, "test")]
    a = Scheduler(database, name="sched-a", schedules=sched)
    b = Scheduler(database, name="sched-b", schedules=sched)
    a.start()
    b.start()
    try:
        wait_for(lambda: a.ran.get("probe-test", 0) + b.ran.get("probe-test", 0) >= 10, timeout=20)
    finally:
        a.stop()
        b.stop()
    with database.transaction() as conn:
        rows = conn.execute(
            "SELECT tick_at, count(*) AS n, count(finished_at) AS done FROM scheduler_ticks "
            "WHERE job_name = 'probe-test' GROUP BY tick_at").fetchall()
    assert all(r["n"] == 1 for r in rows)
    total = a.ran.get("probe-test", 0) + b.ran.get("probe-test", 0)
    assert len(runs) == total == len(rows)


def test_run_tick_guard_is_exclusive(database):
    count = []
    sched = Schedule("guard", "1h", lambda _db: count.append(1), "test")
    tick = datetime(2026, 1, 1, tzinfo=timezone.utc)
    schedulers = [Scheduler(database, name=f"s{i}", schedules=[]) for i in range(6)]
    barrier = threading.Barrier(len(schedulers))
    results = []

    def go(s):
        barrier.wait()
        results.append(s.run_tick(sched, tick))

    threads = [threading.Thread(target=go, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert count == [1]


def test_default_schedules_cover_the_issue():
    names = {s.name: s.default for s in scheduler.SCHEDULES}
    assert names == {"reclaim": "10s", "refresh": "15s", "rebalance": "30s", "probe": "2s",
                     "prune": "1h", "doorbell": "5s"}
