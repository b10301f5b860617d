"""Cron-like housekeeping on APScheduler, each tick run once cluster-wide.

Any number of schedulers may run (one inside every `aibot bot`, or `aibot scheduler` alone). Triggers
are aligned to the epoch, so every scheduler computes the same tick time for the same firing; before
running a tick a scheduler inserts `(job, tick)` into `aibot.scheduler_ticks` with ON CONFLICT DO
NOTHING, and only the one whose insert landed runs it. A slow or dead scheduler therefore costs
nothing but its own ticks.

The jobs are those declared in `aibot.scheduler.jobs`; their schedules come from the settings
(`AIBOT_SCHEDULE_<JOB>`): an interval (`10s`, `5m`, `1h`), a five-field cron expression
(`*/5 * * * *`), or `off`. A schedule for a job that does not exist, or one that does not parse, is a
SettingsError naming the variable.

A tick that is still running when its next firing comes (a rebalance waiting on a cold load) makes that
firing a no-op: one instance per job, missed firings coalesced. APScheduler logs every such skip as a
warning ("maximum number of running instances reached"), up to one a second per job with the test
schedules; they are expected, so they are counted instead and reported once, at INFO, when the long
tick ends.

Owns the `scheduler_ticks` rows; the jobs themselves are `aibot.scheduler.jobs`.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timedelta, timezone

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from aibot import db, log
from aibot.scheduler import jobs
from aibot.scheduler.jobs import Schedule
from aibot.settings import Settings, SettingsError, get_settings, schedule_variable

logger = logging.getLogger(__name__)
queries = db.Queries(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_schedule(text: str):
    """`'10s'` → IntervalTrigger aligned to the epoch; five cron fields → CronTrigger; `'off'` → None."""
    text = text.strip()
    if text.lower() in ("off", "none", "disabled", ""):
        return None
    m = _INTERVAL.match(text)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise ValueError(f"schedule interval must be positive: {text!r}")
        return IntervalTrigger(seconds=seconds, start_date=EPOCH, timezone=timezone.utc)
    if len(text.split()) == 5:
        try:
            return CronTrigger.from_crontab(text, timezone=timezone.utc)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {text!r}: {exc}") from None
    raise ValueError(f"schedule {text!r} is neither an interval like '10s' nor a 5-field cron expression")


def schedule_text(sched: Schedule, settings: Settings) -> tuple[str, str]:
    """The schedule this process runs `sched` at, and where it comes from (its variable or 'default')."""
    if sched.name in settings.schedules:
        return settings.schedules[sched.name], sched.variable
    return sched.default, "default"


def triggers(settings: Settings, schedules: list[Schedule]) -> dict[str, object]:
    """{job: trigger} for every job that is not `off`; errors name the variable."""
    known = {s.name for s in jobs.schedules()} | {s.name for s in schedules}
    unknown = sorted(set(settings.schedules) - known)
    if unknown:
        raise SettingsError(f"{', '.join(schedule_variable(n) for n in unknown)}: no such scheduled job; "
                            f"jobs: {', '.join(sorted(known))}")
    out = {}
    for sched in schedules:
        text, source = schedule_text(sched, settings)
        try:
            trigger = parse_schedule(text)
        except ValueError as exc:
            raise SettingsError(f"{source if source != 'default' else sched.name}: {exc}") from None
        if trigger is not None:
            out[sched.name] = trigger
    return out


def tick_time(trigger, now: datetime) -> datetime:
    """The firing this run belongs to: the first fire time after `now - tolerance`.

    Every scheduler computes the same value for the same firing, which is what makes the tick row a
    cluster-wide once-only guard; the tolerance absorbs a late wake-up of up to half a period (5 s max).
    """
    tolerance = timedelta(seconds=5)
    if isinstance(trigger, IntervalTrigger):
        tolerance = min(tolerance, trigger.interval / 2)
    return trigger.get_next_fire_time(None, now - tolerance)


class _ExpectedSkips(logging.Filter):
    """Drops APScheduler's per-firing skip warning (apscheduler/schedulers/base.py `_process_jobs`, 3.11:
    "Execution of job %s skipped: maximum number of running instances reached (%d)"); the Scheduler's
    EVENT_JOB_MAX_INSTANCES listener counts the skips instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in str(record.msg)


_aps_logger = logging.getLogger("apscheduler.scheduler")
if not any(isinstance(f, _ExpectedSkips) for f in _aps_logger.filters):
    _aps_logger.addFilter(_ExpectedSkips())


class Scheduler:
    def __init__(self, database: db.Database, *, name: str | None = None, settings: Settings | None = None,
                 schedules: list[Schedule] | None = None) -> None:
        self.database = database
        self.name = name or log.default_worker_name("scheduler")
        self._aps = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        self.ran: dict[str, int] = {}
        self.skipped: dict[str, int] = {}       # firings skipped because the previous tick still ran
        self._skips_since: dict[str, int] = {}  # ... since that tick started, for its end-of-tick line
        self._lock = threading.Lock()
        self._aps.add_listener(self._on_skip, EVENT_JOB_MAX_INSTANCES)
        chosen = jobs.schedules() if schedules is None else schedules
        self.triggers = triggers(settings or get_settings(), chosen)
        for sched in chosen:
            if sched.name in self.triggers:
                self._aps.add_job(self._run, self.triggers[sched.name], args=(sched,), id=sched.name, name=sched.name)

    def start(self) -> None:
        self._aps.start()
        logger.info("scheduler %s started: %s", self.name,
                    ", ".join(f"{n}={t}" for n, t in self.triggers.items()))

    def stop(self) -> None:
        self._aps.shutdown(wait=True)

    def _on_skip(self, event: JobSubmissionEvent) -> None:
        with self._lock:
            self.skipped[event.job_id] = self.skipped.get(event.job_id, 0) + 1
            self._skips_since[event.job_id] = self._skips_since.get(event.job_id, 0) + 1
        logger.debug("%s: firing skipped, the previous tick is still running", event.job_id)

    def _run(self, sched: Schedule) -> None:
        trigger = self.triggers[sched.name]
        tick = tick_time(trigger, datetime.now(timezone.utc))
        started = datetime.now(timezone.utc)
        with log.context(worker=self.name, job=f"tick:{sched.name}"):
            try:
                self.run_tick(sched, tick)
            except db.CONNECTION_ERRORS as exc:
                # Expected (a PostgreSQL restart, pg_terminate_backend): the next firing runs the job
                # again on a fresh connection, so one line, no traceback.
                logger.warning("tick %s at %s skipped: database session lost (%s: %s)", sched.name,
                               tick.isoformat(), type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                self.database.discard_broken()
            except Exception:
                logger.exception("tick %s at %s failed", sched.name, tick.isoformat())
            finally:
                with self._lock:
                    skips = self._skips_since.pop(sched.name, 0)
                if skips:
                    took = (datetime.now(timezone.utc) - started).total_seconds()
                    logger.info("%s tick took %.0fs; %d firing(s) skipped while it ran", sched.name, took, skips)

    def run_tick(self, sched: Schedule, tick: datetime) -> bool:
        """Runs `sched` for `tick` unless another scheduler already took that tick; True if it ran."""
        with self.database.transaction() as conn:
            won = queries.one(conn, "tick_claim", {"job_name": sched.name, "tick_at": tick, "runner": self.name})
        if not won:
            return False
        result = sched.body(self.database)
        with self.database.transaction() as conn:
            queries.run(conn, "tick_finish", {"job_name": sched.name, "tick_at": tick})
        with self._lock:
            self.ran[sched.name] = self.ran.get(sched.name, 0) + 1
        if result:
            logger.info("%s: %s", sched.name, result)
        return True


def start_in_background(settings=None) -> Scheduler:
    """Used by `aibot bot` to run the scheduler in the bot's process."""
    settings = settings or get_settings()
    sched = Scheduler(db.Database(settings.database_url, max_size=4), settings=settings)
    sched.start()
    return sched
