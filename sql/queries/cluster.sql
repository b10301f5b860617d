-- Cluster state: servers from config, resident models, slot rows, the single-flight model loader and
-- the shared per-server backoff. Used by aibot.cluster, aibot.model_loader and aibot.health.

-- cluster_now --
-- The database clock, so residency and backoff decisions do not depend on each host's clock
SELECT now() AS now;

-- cluster_servers --
-- Every server row (enabled or not), in name order
SELECT * FROM servers ORDER BY name;

-- cluster_server_by_name --
-- One server by its config name
SELECT * FROM servers WHERE name = %(name)s;

-- cluster_server_by_id --
-- One server by id
SELECT * FROM servers WHERE id = %(server_id)s;

-- cluster_server_lock --
-- Serialises load decisions on one server, so two loads cannot both pass the memory check
SELECT * FROM servers WHERE id = %(server_id)s FOR UPDATE;

-- cluster_upsert_server --
-- Writes a server's config; health/backoff columns are left to aibot.health
INSERT INTO servers (name, url, kind, enabled, configured_memory_bytes, memory_bytes, memory_source,
                     system_reserve_bytes, safety_fraction, per_request_bytes, hard_cap, default_parallel,
                     token_env, configured_max_loaded, max_loaded)
VALUES (%(name)s, %(url)s, %(kind)s, %(enabled)s, %(configured_memory_bytes)s, %(memory_bytes)s,
        %(memory_source)s, %(system_reserve_bytes)s, %(safety_fraction)s, %(per_request_bytes)s, %(hard_cap)s,
        %(default_parallel)s, %(token_env)s, %(configured_max_loaded)s, %(configured_max_loaded)s)
ON CONFLICT (name) DO UPDATE SET
    url = EXCLUDED.url,
    kind = EXCLUDED.kind,
    enabled = EXCLUDED.enabled,
    configured_memory_bytes = EXCLUDED.configured_memory_bytes,
    memory_bytes = EXCLUDED.memory_bytes,
    memory_source = EXCLUDED.memory_source,
    system_reserve_bytes = EXCLUDED.system_reserve_bytes,
    safety_fraction = EXCLUDED.safety_fraction,
    per_request_bytes = EXCLUDED.per_request_bytes,
    hard_cap = EXCLUDED.hard_cap,
    default_parallel = EXCLUDED.default_parallel,
    token_env = EXCLUDED.token_env,
    configured_max_loaded = EXCLUDED.configured_max_loaded,
    max_loaded = coalesce(servers.max_loaded, EXCLUDED.configured_max_loaded),
    updated_at = now()
RETURNING *, (xmax = 0) AS inserted;

-- cluster_disable_missing_servers --
-- Servers no longer in config stay (history, in-flight work) but take no new work
UPDATE servers SET enabled = false, updated_at = now()
WHERE enabled AND NOT (name = ANY (%(names)s::text[]))
RETURNING name;

-- cluster_set_memory --
-- Records a server's effective RAM and when its models were last listed
UPDATE servers
SET memory_bytes = %(memory_bytes)s, memory_source = %(memory_source)s, refreshed_at = now(), updated_at = now()
WHERE id = %(server_id)s;

-- cluster_instances --
-- Resident models with their requests in flight (held slots), last use and last load time, for one server or all
SELECT mi.server_id, mi.model, mi.state, mi.size_bytes, mi.parallel, mi.context_length, mi.loaded_at,
       greatest(mi.last_used_at, h.last_taken) AS last_used_at,
       coalesce(h.held, 0)::integer AS held,
       (SELECT extract(epoch FROM ml.finished_at - ml.started_at)::double precision
        FROM model_loads ml
        WHERE ml.server_id = mi.server_id AND ml.model = mi.model AND ml.action = 'load' AND ml.ok
        ORDER BY ml.finished_at DESC LIMIT 1) AS load_seconds
FROM model_instances mi
LEFT JOIN (
    SELECT sl.server_id, sl.model, count(*) AS held, max(sl.taken_at) AS last_taken
    FROM slots sl
    WHERE sl.job_id IS NOT NULL
    GROUP BY sl.server_id, sl.model
) h ON h.server_id = mi.server_id AND h.model = mi.model
WHERE %(server_id)s::integer IS NULL OR mi.server_id = %(server_id)s::integer
ORDER BY mi.server_id, mi.model;

-- cluster_model_residency --
-- Where a model is resident, and whether claims may use that server now
SELECT mi.server_id, s.name, mi.state, mi.instance_id,
       (s.enabled AND NOT s.draining AND s.health <> 'down'
        AND (s.backoff_until IS NULL OR s.backoff_until <= now())) AS usable
FROM model_instances mi
JOIN servers s ON s.id = mi.server_id
WHERE mi.model = %(model)s
ORDER BY s.name;

-- cluster_upsert_instance --
-- A model the server lists as resident, under the configured name. From a refresh, an eviction in
-- progress ('unloading') is not undone and our own load in progress ('loading') is not declared done;
-- the loader itself (%(loader)s), holding the model's lock, records what it found as it is.
INSERT INTO model_instances (server_id, model, state, size_bytes, parallel, context_length, instance_id,
                             instances, origin, ttl_seconds)
VALUES (%(server_id)s, %(model)s, %(state)s, %(size_bytes)s, %(parallel)s, %(context_length)s,
        %(instance_id)s, %(instances)s, %(origin)s, %(ttl_seconds)s)
ON CONFLICT (server_id, model) DO UPDATE SET
    state = CASE WHEN %(loader)s THEN EXCLUDED.state
                 WHEN model_instances.state IN ('unloading', 'loading') THEN model_instances.state
                 ELSE EXCLUDED.state END,
    size_bytes = CASE WHEN EXCLUDED.size_bytes > 0 THEN EXCLUDED.size_bytes ELSE model_instances.size_bytes END,
    parallel = EXCLUDED.parallel,
    context_length = coalesce(EXCLUDED.context_length, model_instances.context_length),
    instance_id = coalesce(EXCLUDED.instance_id, model_instances.instance_id),
    instances = EXCLUDED.instances,
    ttl_seconds = EXCLUDED.ttl_seconds
RETURNING *, (xmax = 0) AS inserted;

-- cluster_server_models --
-- The models aibot already records on one server (their names are what the next listing must find)
SELECT model, state, origin, instance_id, parallel, context_length
FROM model_instances WHERE server_id = %(server_id)s ORDER BY model;

-- cluster_wanted_models --
-- Model names queued or running work needs: a refresh looks each of them up in every server's catalogue
SELECT DISTINCT model FROM jobs WHERE state IN ('queued', 'running') AND model IS NOT NULL;

-- cluster_set_catalogue --
-- What a refresh learnt about a server as a whole: the offered names' fingerprint and its own eviction bound
UPDATE servers
SET catalogue_fingerprint = %(fingerprint)s, max_loaded = coalesce(%(max_loaded)s, configured_max_loaded)
WHERE id = %(server_id)s;

-- cluster_delete_vanished_instances --
-- Forgets models the server no longer lists, except one a live loader is loading (it holds the lock)
DELETE FROM model_instances mi
WHERE mi.server_id = %(server_id)s
  AND NOT (mi.model = ANY (%(models)s::text[]))
  AND (mi.state <> 'loading' OR pg_try_advisory_xact_lock(mi.server_id, hashtext(mi.model)))
RETURNING mi.model, mi.state;

-- cluster_catalog_upsert --
-- Remembers a model's real size (and where it came from) so it can be placed when it is loaded nowhere
INSERT INTO model_catalog (model, size_bytes, parallel, context_length, size_source)
VALUES (%(model)s, %(size_bytes)s, %(parallel)s, %(context_length)s, %(size_source)s)
ON CONFLICT (model) DO UPDATE SET
    size_bytes = EXCLUDED.size_bytes,
    parallel = coalesce(EXCLUDED.parallel, model_catalog.parallel),
    context_length = coalesce(EXCLUDED.context_length, model_catalog.context_length),
    size_source = EXCLUDED.size_source,
    seen_at = now();

-- cluster_catalog_get --
-- A model's last known size
SELECT * FROM model_catalog WHERE model = %(model)s;

-- cluster_queued_demand --
-- Queued jobs per model: the demand the slot split and eviction order prefer
SELECT model, count(*)::integer AS queued
FROM jobs
WHERE state = 'queued' AND model IS NOT NULL
GROUP BY model;

-- cluster_unplaced_demand --
-- Runnable models that no usable server holds or is loading: what the loader should bring in, in the
-- order of their best-ranked job, so aging reaches a rarely used model too (a most-wanted-first order
-- starved it in bench/swap_thrash.py)
SELECT j.model, count(*)::integer AS queued
FROM jobs j
WHERE j.state = 'queued' AND j.model IS NOT NULL AND j.available_at <= now() AND j.reply IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM model_instances mi
      JOIN servers s ON s.id = mi.server_id
      WHERE mi.model = j.model AND mi.state IN ('loaded', 'loading')
        AND s.enabled AND NOT s.draining AND s.health <> 'down'
        AND (s.backoff_until IS NULL OR s.backoff_until <= now()))
GROUP BY j.model
ORDER BY min(j.rank);

-- cluster_rebalance_lock --
-- One rebalancer per server at a time (scheduler and loaders may both rebalance)
SELECT pg_advisory_xact_lock(hashtext('aibot.rebalance'), %(server_id)s);

-- cluster_lock_server_slots --
-- Locks a server's slot rows so counts and edits are exact; concurrent claims skip them meanwhile
SELECT id FROM slots WHERE server_id = %(server_id)s ORDER BY id FOR UPDATE;

-- cluster_slot_counts --
-- Slot rows per (server, model) by kind: free, held, retired-and-held, retired-and-free (stale)
SELECT server_id, model,
       count(*) FILTER (WHERE job_id IS NULL AND NOT retired)::integer AS free,
       count(*) FILTER (WHERE job_id IS NOT NULL AND NOT retired)::integer AS held,
       count(*) FILTER (WHERE job_id IS NOT NULL AND retired)::integer AS retired_held,
       count(*) FILTER (WHERE job_id IS NULL AND retired)::integer AS retired_free
FROM slots
WHERE %(server_id)s::integer IS NULL OR server_id = %(server_id)s::integer
GROUP BY server_id, model
ORDER BY server_id, model;

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

-- cluster_lock_pair_slots --
-- Locks one pair's slot rows (eviction/unload): claims skip them, and held ones are visible
SELECT id, job_id FROM slots WHERE server_id = %(server_id)s AND model = %(model)s ORDER BY id FOR UPDATE;

-- cluster_delete_pair_free_slots --
-- Takes away a pair's free slots before its model is unloaded
DELETE FROM slots WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NULL;

-- cluster_retire_pair_slots --
-- Forced unload: the pair's held slots go when their jobs finish
UPDATE slots SET retired = true WHERE server_id = %(server_id)s AND model = %(model)s AND job_id IS NOT NULL;

-- cluster_try_lock_model --
-- Single flight: the session lock a loader holds for the whole HTTP load/unload of (server, model)
SELECT pg_try_advisory_lock(%(server_id)s, hashtext(%(model)s)) AS locked;

-- cluster_wait_lock_model --
-- Waits (bounded by lock_timeout) for whoever loads (server, model) to finish
SELECT pg_advisory_lock(%(server_id)s, hashtext(%(model)s));

-- cluster_lock_model_placement --
-- Serialises placement decisions for one model cluster-wide (to the end of the transaction), so two
-- loaders cannot pick two different servers for the same demand
SELECT pg_advisory_xact_lock(hashtextextended('aibot.place:' || %(model)s, 0));

-- cluster_unlock_model --
-- Releases the single-flight lock
SELECT pg_advisory_unlock(%(server_id)s, hashtext(%(model)s)) AS unlocked;

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

-- cluster_orphan_load_done --
-- The orphaned load finished at the server after all: close its history row as a success
UPDATE model_loads SET finished_at = now(), ok = true, error = 'finished after its loader went away'
WHERE server_id = %(server_id)s AND model = %(model)s AND action = 'load' AND finished_at IS NULL;

-- cluster_load_abandon --
-- Loads left open by a loader that died (we now hold their lock): close them as failed
UPDATE model_loads SET finished_at = now(), ok = false, error = 'abandoned: the loader went away'
WHERE server_id = %(server_id)s AND model = %(model)s AND finished_at IS NULL;

-- cluster_worker_hosts --
-- Hosts with live worker processes, for `aibot plan`'s per-host Dramatiq command
SELECT host, count(*)::integer AS processes, max(heartbeat_at) AS heartbeat_at
FROM workers
WHERE role = 'worker' AND heartbeat_at > now() - make_interval(secs => %(live_seconds)s)
GROUP BY host
ORDER BY host;

-- health_record_fault --
-- One server fault, counted for every worker on every host; the threshold-th consecutive one backs the
-- server off (health down). A trip within the flap window of the last recovery goes one level up, an
-- isolated one is level 1 (aibot.next_backoff_level). Faults while it is down or backed off only count:
-- a down server comes back through the probe, not through the expiry of its backoff.
WITH cur AS (
    SELECT id, failure_count, backoff_level, backoff_until,
           next_backoff_level(backoff_level, backoff_until, recovered_at, %(flap_seconds)s) AS level,
           (health <> 'down' AND failure_count + 1 >= %(threshold)s
            AND (backoff_until IS NULL OR backoff_until <= now())) AS trip
    FROM servers WHERE id = %(server_id)s FOR UPDATE
)
UPDATE servers s SET
    failure_count = cur.failure_count + 1,
    last_error = %(error)s,
    backoff_level = CASE WHEN cur.trip THEN cur.level ELSE cur.backoff_level END,
    backoff_until = CASE WHEN cur.trip
        THEN now() + make_interval(secs => backoff_seconds(cur.level - 1, %(base)s, %(cap)s, %(jitter)s))
        ELSE cur.backoff_until END,
    health = CASE WHEN cur.trip THEN 'down' ELSE s.health END,
    updated_at = now()
FROM cur
WHERE s.id = cur.id
RETURNING s.id, s.name, s.failure_count, s.backoff_level, s.backoff_until, s.health, cur.trip AS tripped;

-- health_probe_failed --
-- A probe of a down server failed: it stays down, and is probed again at the probe cadence
UPDATE servers SET
    failure_count = failure_count + 1,
    last_error = %(error)s,
    health = 'down',
    probed_at = now(),
    backoff_until = coalesce(backoff_until, now()),
    updated_at = now()
WHERE id = %(server_id)s
RETURNING id, name, failure_count, backoff_level, backoff_until, health;

-- health_probe_held --
-- A probe answered, but the server flapped (it failed again soon after its last recovery): it stays
-- down until its backoff ends, so a flapping server cannot bounce at the probe cadence
UPDATE servers SET probed_at = now(), updated_at = now()
WHERE id = %(server_id)s
RETURNING id, name, failure_count, backoff_level, backoff_until, health;

-- health_record_ok --
-- The server answered: clear the shared failure count and backoff; the level is kept for the flap window
UPDATE servers
SET failure_count = 0, backoff_until = NULL, health = 'healthy', last_ok_at = now(), probed_at = now(),
    recovered_at = CASE WHEN health <> 'healthy' OR backoff_until IS NOT NULL THEN now() ELSE recovered_at END,
    updated_at = now()
WHERE id = %(server_id)s
RETURNING id, name, failure_count, backoff_level, backoff_until, health;

-- health_due_probes --
-- Enabled servers to probe: never checked, or down and not probed within the probe cadence
SELECT *, (backoff_level > 1 AND backoff_until > now()) AS flapping FROM servers
WHERE enabled
  AND (health = 'unknown'
       OR (health = 'down' AND (probed_at IS NULL
                                OR probed_at <= now() - make_interval(secs => %(every_seconds)s))))
ORDER BY name;

-- health_pairs --
-- Per-(server, model) refusals and backoffs, for one server or all (placement skips them)
SELECT mh.*, s.name AS server, (mh.backoff_until > now()) AS backed_off
FROM model_health mh JOIN servers s ON s.id = mh.server_id
WHERE (%(server_id)s::integer IS NULL OR mh.server_id = %(server_id)s::integer)
  AND (mh.unavailable_reason IS NOT NULL OR mh.backoff_until > now() OR mh.failure_count > 0)
ORDER BY s.name, mh.model;

-- health_mark_unavailable --
-- This server will not serve this model as configured: remembered with the fingerprints it was refused under
INSERT INTO model_health (server_id, model, unavailable_reason, unavailable_catalogue, unavailable_config, last_error)
SELECT s.id, %(model)s, %(reason)s, s.catalogue_fingerprint, %(config)s, %(reason)s
FROM servers s WHERE s.id = %(server_id)s
ON CONFLICT (server_id, model) DO UPDATE SET
    unavailable_reason = EXCLUDED.unavailable_reason,
    unavailable_catalogue = EXCLUDED.unavailable_catalogue,
    unavailable_config = coalesce(EXCLUDED.unavailable_config, model_health.unavailable_config),
    last_error = EXCLUDED.last_error,
    updated_at = now()
    WHERE model_health.unavailable_reason IS DISTINCT FROM EXCLUDED.unavailable_reason
       OR model_health.unavailable_catalogue IS DISTINCT FROM EXCLUDED.unavailable_catalogue
RETURNING server_id, model;

-- health_clear_stale_refusals --
-- Refusals made under another catalogue of this server are tried again (its model list changed)
UPDATE model_health
SET unavailable_reason = NULL, unavailable_catalogue = NULL, updated_at = now()
WHERE server_id = %(server_id)s AND unavailable_reason IS NOT NULL
  AND unavailable_catalogue IS DISTINCT FROM %(fingerprint)s
RETURNING model;

-- health_clear_config_refusals --
-- Refusals made under another configuration are tried again
UPDATE model_health
SET unavailable_reason = NULL, unavailable_catalogue = NULL, unavailable_config = NULL, updated_at = now()
WHERE unavailable_reason IS NOT NULL AND unavailable_config IS DISTINCT FROM %(config)s
RETURNING server_id, model;

-- health_model_row --
-- Makes sure a (server, model) pair has its health row (faults are rare: two statements are fine)
INSERT INTO model_health (server_id, model) VALUES (%(server_id)s, %(model)s)
ON CONFLICT (server_id, model) DO NOTHING;

-- health_record_model_fault --
-- A fault of one (server, model) pair, shared by every worker; the threshold-th consecutive one backs
-- that pair off (the server's other models are untouched)
WITH cur AS (
    SELECT server_id, model, failure_count, backoff_level, backoff_until, recovered_at,
           (failure_count + 1 >= %(threshold)s AND (backoff_until IS NULL OR backoff_until <= now())) AS trip
    FROM model_health WHERE server_id = %(server_id)s AND model = %(model)s FOR UPDATE
), lvl AS (
    SELECT cur.*, next_backoff_level(cur.backoff_level, cur.backoff_until, cur.recovered_at, %(flap_seconds)s) AS level FROM cur
)
UPDATE model_health mh SET
    failure_count = lvl.failure_count + 1,
    last_error = %(error)s,
    backoff_level = CASE WHEN lvl.trip THEN lvl.level ELSE lvl.backoff_level END,
    backoff_until = CASE WHEN lvl.trip
        THEN now() + make_interval(secs => backoff_seconds(lvl.level - 1, %(base)s, %(cap)s, %(jitter)s))
        ELSE lvl.backoff_until END,
    updated_at = now()
FROM lvl
WHERE mh.server_id = lvl.server_id AND mh.model = lvl.model
RETURNING mh.server_id, mh.model, mh.failure_count, mh.backoff_level, mh.backoff_until, lvl.trip AS tripped;

-- health_record_model_ok --
-- The pair served again: its failure count and backoff start over (the level is kept for the flap window)
UPDATE model_health
SET failure_count = 0, backoff_until = NULL,
    recovered_at = CASE WHEN backoff_until IS NOT NULL OR failure_count > 0 THEN now() ELSE recovered_at END,
    updated_at = now()
WHERE server_id = %(server_id)s AND model = %(model)s AND (failure_count > 0 OR backoff_until IS NOT NULL)
RETURNING server_id, model;

-- cluster_set_lock_timeout --
-- Bounds how long this session waits for another loader's lock (milliseconds, as text)
SELECT set_config('lock_timeout', %(ms)s, false);

-- cluster_reset_lock_timeout --
-- Back to the server default after a bounded wait
SELECT set_config('lock_timeout', '0', false);
