-- The scheduler's cluster-wide tick guard (aibot.scheduler.runner), over aibot.scheduler_ticks.

-- tick_claim --
-- Takes one tick of one scheduled job for this scheduler; returns a row only for the one scheduler
-- (of however many run) whose insert landed, which is what makes every tick run once cluster-wide
INSERT INTO scheduler_ticks (job_name, tick_at, runner)
VALUES (%(job_name)s, %(tick_at)s, %(runner)s)
ON CONFLICT (job_name, tick_at) DO NOTHING
RETURNING job_name;

-- tick_finish --
-- Records that the tick's work completed (a tick with no finished_at crashed mid-way)
UPDATE scheduler_ticks SET finished_at = now() WHERE job_name = %(job_name)s AND tick_at = %(tick_at)s;
