-- Ringing the doorbell is one statement (issue 13: dispatch latency).
--
-- aibot.queue.doorbell.ring used to take four round trips inside the caller's transaction (the bot's
-- ingest, a worker leaving its loop, the scheduler's tick): how many claims could succeed, whether
-- work waits for a model loaded nowhere, how many wake-ups already wait, then the insert and its
-- NOTIFY. The bot's ingest pays them on the path from a chat message to its request at a server.
-- The count becomes this view, so the query that rings (sql/queries/queue/doorbell.sql doorbell_ring)
-- and the one that only reads it (doorbell_matchable, the worker's retry of an empty claim) state it
-- once.
--
-- enqueue_dramatiq_messages(queue, messages)  inserts Dramatiq messages (their JSON encoding) into
--                  dramatiq-postgres' queue table, the row shape dramatiq-postgres writes itself, and
--                  NOTIFYs its consumers' channel (sent at commit) when it inserted any; returns how many.
--                  The one statement of that row shape and channel, for the ring and for doorbell_insert.
-- doorbell_wanted  matchable: how many claims could succeed right now, per model min(runnable jobs,
--                  free usable slots), plus jobs whose reply is stored and only needs delivering (they
--                  take no slot). Each model is counted with a LIMIT of its free slots, so the count
--                  costs O(free slots) however deep the queue (the query it replaces counted every
--                  queued job of a model with a free slot: 476 ms at 1M queued, bench/doorbell_scaling.py).
--                  wanted: the wake-ups worth having, which is matchable or, when nothing is claimable
--                  but runnable work waits for a model no usable server holds or is loading, one (a
--                  worker comes up empty and starts its demand loader now rather than at the next
--                  rebalance tick). That check visits one index entry per queued model, not every job.

CREATE FUNCTION aibot.enqueue_dramatiq_messages(p_queue text, p_messages jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    -- dramatiq_postgres/broker.py (QUERIES.ENQUEUE): the queue table's columns and the
    -- 'dramatiq.<queue>.enqueue' channel its consumers LISTEN on.
    INSERT INTO dramatiq.queue (queue_name, message_id, "state", message, available_at)
    SELECT p_queue, (m ->> 'message_id')::uuid, 'queued', m, now()
    FROM jsonb_array_elements(coalesce(p_messages, '[]'::jsonb)) AS m;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('dramatiq.' || p_queue || '.enqueue', '');
    END IF;
    RETURN n;
END;
$$;

CREATE VIEW aibot.doorbell_wanted AS
WITH counted AS MATERIALIZED (
    -- Each model's runnable jobs are counted only up to its free slots (a LIMIT per model, in the order
    -- of jobs_claimable_model so that the index serves it): the count costs O(free slots), not O(queued
    -- jobs), which a deep backlog would make of every ingest. MATERIALIZED: matchable is read twice
    -- below, and an inlined CTE would be computed twice.
    SELECT coalesce((SELECT sum(d.n) FROM aibot.model_free_slots f
                     CROSS JOIN LATERAL (
                         SELECT count(*) AS n FROM (
                             SELECT 1 FROM aibot.jobs j
                             WHERE j.state = 'queued' AND j.model = f.model AND j.available_at <= now()
                               AND j.reply IS NULL
                             ORDER BY j.rank, j.id
                             LIMIT f.free) runnable) d), 0)::int
         + (SELECT count(*) FROM aibot.jobs
            WHERE state = 'queued' AND available_at <= now() AND reply IS NOT NULL)::int AS matchable
)
SELECT c.matchable,
       CASE WHEN c.matchable > 0 THEN c.matchable
            WHEN EXISTS (
                -- The models with queued work, one index probe each (a loose scan of jobs_claimable_model),
                -- not every queued job: with a deep backlog and every slot busy, this runs on every ring.
                WITH RECURSIVE queued_models(model) AS (
                    (SELECT j.model FROM aibot.jobs j
                     WHERE j.state = 'queued' AND j.reply IS NULL AND j.model IS NOT NULL
                     ORDER BY j.model LIMIT 1)
                    UNION ALL
                    SELECT (SELECT j.model FROM aibot.jobs j
                            WHERE j.state = 'queued' AND j.reply IS NULL AND j.model > q.model
                            ORDER BY j.model LIMIT 1)
                    FROM queued_models q WHERE q.model IS NOT NULL
                )
                SELECT 1 FROM queued_models q
                WHERE q.model IS NOT NULL
                  AND NOT EXISTS (
                      SELECT 1 FROM aibot.model_instances mi JOIN aibot.usable_servers u ON u.id = mi.server_id
                      WHERE mi.model = q.model AND mi.state IN ('loaded', 'loading'))
                  AND EXISTS (
                      SELECT 1 FROM aibot.jobs j
                      WHERE j.state = 'queued' AND j.model = q.model AND j.reply IS NULL
                        AND j.available_at <= now())) THEN 1
            ELSE 0 END AS wanted
FROM counted c;

COMMENT ON VIEW aibot.doorbell_wanted IS
    'How many claims could succeed now (matchable) and how many claim-actor wake-ups are worth having (wanted).';
