-- Housekeeping the scheduled jobs do on the scheduler's own rows (aibot.scheduler.jobs).

-- ticks_prune --
-- Tick rows are only a guard; a day of history is plenty for operators
DELETE FROM scheduler_ticks WHERE tick_at < now() - make_interval(secs => %(older_than_seconds)s);
