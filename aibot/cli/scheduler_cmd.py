"""`aibot scheduler`: the housekeeping scheduler on its own (it also runs inside `aibot bot`)."""

from __future__ import annotations

import os
import signal
import threading

from aibot import db, log
from aibot.cli.render import Column, print_, table


def register(sub) -> None:
    p = sub.add_parser("scheduler", help="run the cluster-wide scheduled jobs (reclaim, refresh, rebalance, probe, prune, doorbell)")
    p.add_argument("--run-once", metavar="JOB", help="run one job now, once, and exit (bypasses the tick guard)")
    p.add_argument("--list", action="store_true", help="list the jobs and their schedules, then exit")
    p.set_defaults(func=run)


def schedule_table(environ):
    """Every scheduled job with the schedule this process would use (AIBOT_SCHEDULE_<JOB>, else the default)."""
    from aibot import scheduler

    rows = [{"job": s.name, "schedule": environ.get(f"AIBOT_SCHEDULE_{s.name.upper()}", s.default),
             "source": f"AIBOT_SCHEDULE_{s.name.upper()}" if f"AIBOT_SCHEDULE_{s.name.upper()}" in environ else "default",
             "what": s.help} for s in scheduler.SCHEDULES]
    return table(rows, ["job", "schedule", "source", Column("what", "what it does", max_width=90)])


def run(args) -> int:
    from aibot import scheduler, tasks
    from aibot.cli import CliError

    if args.list:
        print_(schedule_table(os.environ))
        return 0
    database = db.Database()
    if args.run_once:
        task = tasks.BY_NAME.get(args.run_once)
        if task is None:
            raise CliError(f"unknown job {args.run_once!r}; choose from {', '.join(tasks.BY_NAME)}")
        print(task(database) or "nothing to do")
        database.close()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sched = scheduler.Scheduler(database)
    log.bind(worker=sched.name)
    sched.start()
    stop.wait()
    sched.stop()
    database.close()
    return 0
