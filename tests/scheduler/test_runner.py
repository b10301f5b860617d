import threading
from datetime import datetime, timedelta, timezone

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from aibot.scheduler import jobs
from aibot.scheduler.jobs import Schedule
from aibot.scheduler.runner import Scheduler, parse_schedule, tick_time
from tests.support.waiting import wait_for


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
    names = {s.name: s.default for s in jobs.schedules()}
    assert names == {"reclaim": "5s", "refresh": "15s", "rebalance": "30s", "probe": "2s",
                     "prune": "1h", "doorbell": "5s"}


def test_a_long_tick_skips_firings_quietly_and_reports_them_once(database, caplog):
    """APScheduler warns on every firing that finds the previous tick still running; those skips are
    expected (one instance per job), so they are counted and summed up in one INFO line instead."""
    import logging

    release = threading.Event()
    started = threading.Event()

    def slow(_db):
        started.set()
        release.wait(20)

    sched = Scheduler(database, name="sched-slow", schedules=[Schedule("slow-test", "100ms", slow, "test")])
    caplog.set_level(logging.DEBUG)
    sched.start()
    try:
        wait_for(started.is_set, timeout=10, message="the slow tick started")
        wait_for(lambda: sched.skipped.get("slow-test", 0) >= 3, timeout=10, message="firings skipped")
        release.set()
        wait_for(lambda: any("firing(s) skipped while it ran" in r.getMessage() for r in caplog.records),
                 timeout=10, message="the end-of-tick summary")
    finally:
        release.set()
        sched.stop()
    assert not [r for r in caplog.records if "maximum number of running instances" in r.getMessage()]
    summary = next(r for r in caplog.records if "firing(s) skipped while it ran" in r.getMessage())
    assert summary.levelno == logging.INFO and summary.getMessage().startswith("slow-test tick took")


def test_schedules_come_from_the_settings_and_errors_name_the_variable(database):
    from aibot.settings import Settings, SettingsError

    sched = Scheduler(database, name="s", settings=Settings.from_sources({"AIBOT_SCHEDULE_PRUNE": "off",
                                                                         "AIBOT_SCHEDULE_REFRESH": "5s"}))
    assert "prune" not in sched.triggers and sched.triggers["refresh"].interval == timedelta(seconds=5)
    with pytest.raises(SettingsError, match="AIBOT_SCHEDULE_REFRESH: schedule 'every tuesday'"):
        Scheduler(database, settings=Settings.from_sources({"AIBOT_SCHEDULE_REFRESH": "every tuesday"}))
    with pytest.raises(SettingsError, match="AIBOT_SCHEDULE_REFERSH: no such scheduled job"):
        Scheduler(database, settings=Settings.from_sources({"AIBOT_SCHEDULE_REFERSH": "5s"}))


def test_jobs_are_declared_once_and_the_harness_schedules_derive_from_them():
    from aibot.harness import FAST_SCHEDULES

    assert FAST_SCHEDULES == {s.variable: s.fast for s in jobs.schedules() if s.fast}
    assert FAST_SCHEDULES == {"AIBOT_SCHEDULE_RECLAIM": "1s", "AIBOT_SCHEDULE_REFRESH": "1s",
                              "AIBOT_SCHEDULE_REBALANCE": "1s", "AIBOT_SCHEDULE_PROBE": "1s",
                              "AIBOT_SCHEDULE_DOORBELL": "1s"}
    assert all(callable(s.body) and s.help for s in jobs.schedules())
    with pytest.raises(KeyError, match="unknown job 'nope'; choose from reclaim, refresh"):
        jobs.get("nope")
