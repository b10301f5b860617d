"""`aibot scheduler`: the housekeeping scheduler on its own (it also runs inside `aibot bot`)."""

from __future__ import annotations

import signal
import threading

from aibot import db, log
from aibot.cli.render import Column, print_, table


def register(sub) -> None:
    p = sub.add_parser("scheduler", help="run the cluster-wide scheduled jobs (reclaim, refresh, rebalance, probe, prune, doorbell)")
    p.add_argument("--run-once", metavar="JOB", help="run one job now, once, and exit (bypasses the tick guard)")
    p.add_argument("--list", action="store_true", help="list the jobs and their schedules, then exit")
    p.set_defaults(func=run)


def schedule_table(settings):
    """Every scheduled job with the schedule this process would use (AIBOT_SCHEDULE_<JOB>, else the default)."""
    from aibot.scheduler import jobs
    from aibot.scheduler.runner import schedule_text, triggers

    triggers(settings, jobs.schedules())   # a schedule that does not parse, or names no job, is an error
    rows = []
    for s in jobs.schedules():
        text, source = schedule_text(s, settings)
        rows.append({"job": s.name, "schedule": text, "source": source, "what": s.help})
    return table(rows, ["job", "schedule", "source", Column("what", "what it does", max_width=90)])


def run(args) -> int:
    from aibot.cli import CliError
    from aibot.scheduler import jobs, runner
    from aibot.settings import get_settings
    from aibot.worker import registry

    if args.list:
        print_(schedule_table(get_settings()))
        return 0
    database = db.Database()
    if args.run_once:
        try:
            sched = jobs.get(args.run_once)
        except KeyError as exc:
            raise CliError(exc.args[0]) from None
        print(sched.body(database) or "nothing to do")
        database.close()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sched = runner.Scheduler(database)
    log.bind(worker=sched.name)
    sched.start()
    try:
        with registry.Registered(database, "scheduler", worker_id=sched.name):   # shows under PROCESSES
            stop.wait()
    finally:
        sched.stop()
        database.close()
    return 0
