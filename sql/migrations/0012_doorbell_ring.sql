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
-- doorbell_wanted  matchable: how many claims could succeed right now, per model min(runnable jobs,
--                  free usable slots) plus jobs whose reply is stored and only needs delivering (they
--                  take no slot); wanted: the wake-ups worth having, which is matchable or, when nothing
--                  is claimable but runnable work waits for a model no usable server holds or is
--                  loading, one (a worker comes up empty and starts its demand loader now rather than
--                  at the next rebalance tick).

CREATE VIEW aibot.doorbell_wanted AS
WITH demand AS (
    SELECT j.model, count(*) AS n
    FROM aibot.jobs j
    WHERE j.state = 'queued' AND j.available_at <= now() AND j.reply IS NULL
      AND j.model IN (SELECT f.model FROM aibot.model_free_slots f)
    GROUP BY j.model
), counted AS (
    SELECT coalesce((SELECT sum(least(f.free, d.n)) FROM aibot.model_free_slots f JOIN demand d USING (model)), 0)::int
         + (SELECT count(*) FROM aibot.jobs
            WHERE state = 'queued' AND available_at <= now() AND reply IS NOT NULL)::int AS matchable
)
SELECT c.matchable,
       CASE WHEN c.matchable > 0 THEN c.matchable
            WHEN EXISTS (
                SELECT 1 FROM aibot.jobs j
                WHERE j.state = 'queued' AND j.model IS NOT NULL AND j.available_at <= now() AND j.reply IS NULL
                  AND NOT EXISTS (
                      SELECT 1 FROM aibot.model_instances mi JOIN aibot.usable_servers u ON u.id = mi.server_id
                      WHERE mi.model = j.model AND mi.state IN ('loaded', 'loading'))) THEN 1
            ELSE 0 END AS wanted
FROM counted c;

COMMENT ON VIEW aibot.doorbell_wanted IS
    'How many claims could succeed now (matchable) and how many claim-actor wake-ups are worth having (wanted).';
