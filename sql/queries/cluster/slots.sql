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
