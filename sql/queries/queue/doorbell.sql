-- Doorbells (aibot.queue.doorbell): how many claim-actor wake-ups may succeed now, and their messages
-- in dramatiq-postgres' queue table, inserted in the caller's transaction.

-- doorbell_matchable --
-- How many claims could succeed right now: per model min(runnable jobs, free usable slots), plus jobs
-- whose reply is stored and only needs delivering (they take no slot). Doorbells never exceed this.
WITH free AS (
    SELECT model, free AS n FROM model_free_slots
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
