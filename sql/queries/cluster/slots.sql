-- Rebalancing (aibot.cluster.slots): slot rows per (server, model) kept equal to the sizing result.

-- cluster_rebalance_lock --
-- One rebalancer per server at a time (scheduler and loaders may both rebalance)
SELECT pg_advisory_xact_lock(hashtext('aibot.rebalance'), %(server_id)s);

-- cluster_add_slots --
-- New free slot rows for a pair
INSERT INTO slots (server_id, model)
SELECT %(server_id)s, %(model)s FROM generate_series(1, %(n)s);

-- cluster_delete_free_slots --
-- Removes n free rows of a pair (newest first)
DELETE FROM slots WHERE id IN (
    SELECT id FROM slots
    WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NULL AND NOT retired
    ORDER BY id DESC LIMIT %(n)s);

-- cluster_retire_slots --
-- Marks n held rows of a pair retired: the job finishes, its release deletes the row
UPDATE slots SET retired = true WHERE id IN (
    SELECT id FROM slots
    WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NOT NULL AND NOT retired
    ORDER BY taken_at DESC NULLS FIRST, id DESC LIMIT %(n)s);

-- cluster_unretire_slots --
-- Capacity grew back: n retired-but-held rows of a pair count again
UPDATE slots SET retired = false WHERE id IN (
    SELECT id FROM slots
    WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NOT NULL AND retired
    ORDER BY id LIMIT %(n)s);

-- cluster_delete_stale_retired --
-- Retired rows without a holder should not exist (release deletes them); clear any left behind
DELETE FROM slots WHERE server_id = %(server_id)s AND retired AND job_id IS NULL;

-- cluster_concurrency_samples --
-- Adaptive concurrency (aibot.cluster.concurrency): each recent generation on one server with how many
-- requests were in flight on its (server, model) pair meanwhile, time-weighted and itself included,
-- its size in tokens (reply.tokens, which the worker writes: aibot.generation.tokens.reply_tokens) and its
-- length. A reply without it (stored before the worker wrote it) is no sample, though it still counts as in
-- flight beside the others. The generation interval is
-- started_at (first byte sent) .. generated_at (reply complete).
-- Walks jobs_finished: only jobs finished within the window, the newest `limit` per pair. (The FILTER
-- matters: least/greatest ignore NULLs, so the LEFT JOIN's empty row would count as a full overlap.)
WITH recent AS (
    SELECT j.id, j.model, j.started_at, j.generated_at,
           (j.reply->>'tokens')::double precision AS tokens,
           row_number() OVER (PARTITION BY j.model ORDER BY j.generated_at DESC) AS n
    FROM jobs j
    WHERE j.finished_at > now() - make_interval(secs => %(window_s)s)
      AND j.server_id = %(server_id)s
      AND j.model IS NOT NULL
      AND j.started_at IS NOT NULL
      AND j.generated_at > j.started_at
)
SELECT r.model, r.tokens,
       extract(epoch FROM r.generated_at - r.started_at)::double precision AS seconds,
       1 + coalesce(sum(extract(epoch FROM least(r.generated_at, o.generated_at)
                                          - greatest(r.started_at, o.started_at)))
                    FILTER (WHERE o.id IS NOT NULL), 0)::double precision
           / extract(epoch FROM r.generated_at - r.started_at)::double precision AS concurrency
FROM recent r
LEFT JOIN recent o ON o.model = r.model AND o.id <> r.id
                  AND o.started_at < r.generated_at AND o.generated_at > r.started_at
WHERE r.n <= %(limit)s AND r.tokens IS NOT NULL
GROUP BY r.id, r.model, r.tokens, r.started_at, r.generated_at;
