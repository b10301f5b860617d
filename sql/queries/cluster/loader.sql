-- The single-flight model loader (aibot.cluster.loader): its locks, the memory it reserves, and the
-- history of loads and unloads.

-- cluster_server_lock --
-- Serialises load decisions on one server, so two loads cannot both pass the memory check
SELECT * FROM servers WHERE id = %(server_id)s FOR UPDATE;

-- cluster_try_lock_model --
-- Single flight: the session lock a loader holds for the whole HTTP load/unload of (server, model)
SELECT pg_try_advisory_lock(%(server_id)s, hashtext(%(model)s)) AS locked;

-- cluster_wait_lock_model --
-- Waits (bounded by lock_timeout) for whoever loads (server, model) to finish
SELECT pg_advisory_lock(%(server_id)s, hashtext(%(model)s));

-- cluster_set_lock_timeout --
-- Bounds how long this session waits for another loader's lock (milliseconds, as text)
SELECT set_config('lock_timeout', %(ms)s, false);

-- cluster_reset_lock_timeout --
-- Back to the server default after a bounded wait
SELECT set_config('lock_timeout', '0', false);

-- cluster_unlock_model --
-- Releases the single-flight lock
SELECT pg_advisory_unlock(%(server_id)s, hashtext(%(model)s)) AS unlocked;

-- cluster_lock_model_placement --
-- Serialises placement decisions for one model cluster-wide (to the end of the transaction), so two
-- loaders cannot pick two different servers for the same demand
SELECT pg_advisory_xact_lock(hashtextextended('aibot.place:' || %(model)s, 0));

-- cluster_lock_pair_slots --
-- Locks one pair's slot rows (eviction/unload): claims skip them, and held ones are visible
SELECT id, job_id FROM slots WHERE server_id = %(server_id)s AND model = %(model)s ORDER BY id FOR UPDATE;

-- cluster_delete_pair_free_slots --
-- Takes away a pair's free slots before its model is unloaded
DELETE FROM slots WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NULL;

-- cluster_retire_pair_slots --
-- Forced unload: the pair's held slots go when their jobs finish
UPDATE slots SET retired = true WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NOT NULL;

-- cluster_mark_loading --
-- Reserves the model's memory on the server before the HTTP load; no row if it is already loaded
INSERT INTO model_instances (server_id, model, state, size_bytes, parallel, loaded_at, last_used_at)
VALUES (%(server_id)s, %(model)s, 'loading', %(size_bytes)s, %(parallel)s, now(), now())
ON CONFLICT (server_id, model) DO UPDATE SET
    state = 'loading', size_bytes = EXCLUDED.size_bytes, loaded_at = now(), last_used_at = now()
    WHERE model_instances.state <> 'loaded'
RETURNING *;

-- cluster_mark_loaded --
-- The load finished: the model can serve and will get slots at the next rebalance
UPDATE model_instances
SET state = 'loaded', size_bytes = %(size_bytes)s, parallel = %(parallel)s,
    context_length = %(context_length)s, instance_id = %(instance_id)s, ttl_seconds = %(ttl_seconds)s,
    loaded_at = now(), last_used_at = now()
WHERE server_id = %(server_id)s AND model = %(model)s
RETURNING *;

-- cluster_mark_unloading --
-- An unload is starting: the model serves nothing more, its memory still counts until it is gone
UPDATE model_instances SET state = 'unloading'
WHERE server_id = %(server_id)s AND model = %(model)s AND state = 'loaded'
RETURNING *;

-- cluster_set_instance_state --
-- Puts an instance back (a failed unload leaves the model resident)
UPDATE model_instances SET state = %(state)s WHERE server_id = %(server_id)s AND model = %(model)s;

-- cluster_delete_instance --
-- The model left the server (unloaded, or its load failed)
DELETE FROM model_instances WHERE server_id = %(server_id)s AND model = %(model)s RETURNING *;

-- cluster_load_start --
-- History row for a load/unload, finished by cluster_load_finish
INSERT INTO model_loads (server_id, model, action, reason, worker_id)
VALUES (%(server_id)s, %(model)s, %(action)s, %(reason)s, %(worker_id)s)
RETURNING id;

-- cluster_load_finish --
-- Outcome of a load/unload
UPDATE model_loads SET finished_at = now(), ok = %(ok)s, error = %(error)s WHERE id = %(id)s;

-- cluster_orphan_load --
-- A 'loading' row whose loader went away: the server to ask, and how long ago that load began
SELECT s.*, extract(epoch FROM now() - mi.loaded_at) AS age_seconds
FROM model_instances mi JOIN servers s ON s.id = mi.server_id
WHERE mi.server_id = %(server_id)s AND mi.model = %(model)s AND mi.state = 'loading';

-- cluster_loading_instances --
-- Every 'loading' row and how long ago its load began (the reaper asks which have lost their loader)
SELECT mi.server_id, mi.model, extract(epoch FROM now() - mi.loaded_at) AS age_seconds
FROM model_instances mi WHERE mi.state = 'loading';

-- cluster_orphan_load_done --
-- The orphaned load finished at the server after all: close its history row as a success
UPDATE model_loads SET finished_at = now(), ok = true, error = 'finished after its loader went away'
WHERE server_id = %(server_id)s AND model = %(model)s AND action = 'load' AND finished_at IS NULL;

-- cluster_load_abandon --
-- Loads left open by a loader that died (we now hold their lock): close them as failed
UPDATE model_loads SET finished_at = now(), ok = false, error = 'abandoned: the loader went away'
WHERE server_id = %(server_id)s AND model = %(model)s AND finished_at IS NULL;

-- cluster_set_drains --
-- The demand pass's drains (keys 'server_id/model'): victims of a starving model's swap take no new
-- claims until evicted; every other instance stops draining. Returns the rows that changed
UPDATE model_instances
SET draining = ((server_id::text || '/' || model) = ANY (%(keys)s::text[]))
WHERE draining IS DISTINCT FROM ((server_id::text || '/' || model) = ANY (%(keys)s::text[]))
RETURNING server_id, model, draining;
