-- File format (as procrastinate's sql/queries.sql):
    -- query_name --
    -- why it exists
    -- %(name)s-parameterised SQL

-- doorbell_matchable --
-- How many claims could succeed right now: per model min(runnable jobs, free usable slots), plus jobs
-- whose reply is stored and only needs delivering (they take no slot). Doorbells never exceed this.
WITH free AS (
    SELECT model, sum(free) AS n FROM free_slots GROUP BY model
), demand AS (
    SELECT j.model, count(*) AS n
    FROM jobs j
    WHERE j.state = 'queued' AND j.available_at <= now() AND j.reply IS NULL
      AND j.model IN (SELECT model FROM free)
    GROUP BY j.model
)
SELECT coalesce((SELECT sum(least(f.n, d.n)) FROM free f JOIN demand d USING (model)), 0)::int
     + (SELECT count(*) FROM jobs WHERE state = 'queued' AND available_at <= now() AND reply IS NOT NULL)::int
       AS matchable;

-- doorbell_unplaced_demand --
-- Whether runnable work waits for a model that no usable server holds or is loading
SELECT EXISTS (
    SELECT 1 FROM jobs j
    WHERE j.state = 'queued' AND j.model IS NOT NULL AND j.available_at <= now() AND j.reply IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM model_instances mi JOIN usable_servers u ON u.id = mi.server_id
          WHERE mi.model = j.model AND mi.state IN ('loaded', 'loading'))
) AS waiting;

-- doorbell_outstanding --
-- Wake-ups already waiting in dramatiq-postgres' queue table for the claim actor's queue
SELECT count(*)::int AS n FROM dramatiq.queue WHERE queue_name = %(queue)s AND "state" = 'queued';

-- doorbell_insert --
-- Enqueues claim-actor messages in the caller's transaction (the same row shape dramatiq-postgres writes),
-- so a job insert and its wake-up commit or roll back together
INSERT INTO dramatiq.queue (queue_name, message_id, "state", message, available_at)
SELECT %(queue)s, (m ->> 'message_id')::uuid, 'queued', m, now()
FROM jsonb_array_elements(%(messages)s::jsonb) AS m;

-- doorbell_notify --
-- Wakes idle dramatiq-postgres consumers at commit (NOTIFY is transactional)
SELECT pg_notify('dramatiq.' || %(queue)s || '.enqueue', '');

-- session_async_commit --
-- A worker session's commits do not wait for the WAL flush (see aibot.worker.Runtime for why that is safe)
SET synchronous_commit = off;

-- worker_register --
-- Makes every process visible (the original bot twice had a stray second process nobody could see)
INSERT INTO workers (worker_id, host, pid, role, info)
VALUES (%(worker_id)s, %(host)s, %(pid)s, %(role)s, %(info)s)
ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now(), info = EXCLUDED.info;

-- worker_heartbeat --
-- Liveness of a worker process
UPDATE workers SET heartbeat_at = now() WHERE worker_id = %(worker_id)s;

-- worker_unregister --
-- Clean exit
DELETE FROM workers WHERE worker_id = %(worker_id)s;

-- workers_prune --
-- Forget processes that stopped heartbeating long ago (crashed or killed -9)
DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => %(older_than_seconds)s);

-- server_by_id --
-- What a worker needs to talk to the server its claim's slot is on
SELECT id, name, url, kind, token_env, default_parallel, failure_count FROM servers WHERE id = %(server_id)s;
