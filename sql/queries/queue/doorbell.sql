-- Doorbells (aibot.queue.doorbell): how many claim-actor wake-ups may succeed now, and their messages
-- in dramatiq-postgres' queue table, inserted in the caller's transaction.

-- doorbell_matchable --
-- How many claims could succeed right now (the rule: the doorbell_wanted view, migration 0012)
SELECT matchable FROM doorbell_wanted;

-- doorbell_wanted --
-- How many wake-ups are worth having now (for a broker other than dramatiq-postgres, which rings in Python)
SELECT wanted FROM doorbell_wanted;

-- doorbell_ring --
-- Rings, in the caller's transaction and in one statement, the wake-ups doorbell_wanted allows beyond those
-- already waiting in dramatiq-postgres' queue table: the claim-actor message given (Dramatiq's own
-- encoding), each row with a fresh message id and timestamp, and one NOTIFY (sent at commit) when any
-- was inserted. Two concurrent rings may both see the same waiting count: a wake-up too many comes up
-- empty, which costs one claim statement.
WITH missing AS (
    SELECT greatest(w.wanted - (SELECT count(*) FROM dramatiq.queue q
                                WHERE q.queue_name = %(queue)s AND q."state" = 'queued'), 0)::int AS n
    FROM doorbell_wanted w
), rung AS (
    INSERT INTO dramatiq.queue (queue_name, message_id, "state", message, available_at)
    SELECT %(queue)s, g.id, 'queued',
           %(message)s::jsonb || jsonb_build_object(
               'message_id', g.id, 'message_timestamp', (extract(epoch FROM clock_timestamp()) * 1000)::bigint),
           now()
    FROM (SELECT gen_random_uuid() AS id FROM missing m, generate_series(1, m.n)) g
    RETURNING 1
), notified AS (
    SELECT pg_notify('dramatiq.' || %(queue)s || '.enqueue', '') FROM (SELECT 1 FROM rung LIMIT 1) r
)
SELECT (SELECT count(*) FROM rung)::int AS rung, (SELECT count(*) FROM notified)::int AS notified;

-- doorbell_insert --
-- Enqueues claim-actor messages in the caller's transaction (the same row shape dramatiq-postgres writes),
-- so a job insert and its wake-up commit or roll back together
INSERT INTO dramatiq.queue (queue_name, message_id, "state", message, available_at)
SELECT %(queue)s, (m ->> 'message_id')::uuid, 'queued', m, now()
FROM jsonb_array_elements(%(messages)s::jsonb) AS m;

-- doorbell_notify --
-- Wakes idle dramatiq-postgres consumers at commit (NOTIFY is transactional)
SELECT pg_notify('dramatiq.' || %(queue)s || '.enqueue', '');
