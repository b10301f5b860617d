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
-- encoding), each with a fresh message id and timestamp, enqueued with one NOTIFY when any was inserted.
-- Two concurrent rings may both see the same waiting count: a wake-up too many comes up empty, which
-- costs one claim statement.
SELECT enqueue_dramatiq_messages(%(queue)s, (
    SELECT jsonb_agg(%(message)s::jsonb || jsonb_build_object(
               'message_id', gen_random_uuid(),
               'message_timestamp', (extract(epoch FROM clock_timestamp()) * 1000)::bigint))
    FROM doorbell_wanted w,
         generate_series(1, w.wanted - (SELECT count(*) FROM dramatiq.queue q
                                        WHERE q.queue_name = %(queue)s AND q."state" = 'queued')::int)
)) AS rung;

-- doorbell_insert --
-- Enqueues Dramatiq messages in the caller's transaction (enqueue_dramatiq_messages: the row shape
-- dramatiq-postgres writes, and the NOTIFY its consumers wait for), so a job insert and its wake-up
-- commit or roll back together
SELECT enqueue_dramatiq_messages(%(queue)s, %(messages)s::jsonb) AS n;
