-- Shared reads of the cluster's state (aibot.cluster.state): server rows with the usable-server rule
-- (the usable_servers view of 0002_queue.sql, never restated), resident models, slot counts, queued
-- demand, and the record of a resident model written by both the refresh and the loader.

-- cluster_now --
-- The database clock, so residency and backoff decisions do not depend on each host's clock
SELECT now() AS now;

-- cluster_servers --
-- Every server row (enabled or not), in name order, and whether claims may use it now (usable_servers)
SELECT s.*, s.id IN (SELECT u.id FROM usable_servers u) AS usable FROM servers s ORDER BY s.name;

-- cluster_server_by_name --
-- One server by its config name
SELECT * FROM servers WHERE name = %(name)s;

-- cluster_server_by_id --
-- One server by id
SELECT * FROM servers WHERE id = %(server_id)s;

-- cluster_instances --
-- Resident models with their requests in flight (held slots), last use (any slot taken or freed) and last load time, for one server or all
SELECT mi.server_id, mi.model, mi.state, mi.size_bytes, mi.parallel, mi.context_length, mi.loaded_at, mi.draining,
       greatest(mi.last_used_at, h.last_taken) AS last_used_at,
       coalesce(h.held, 0)::integer AS held,
       (SELECT extract(epoch FROM ml.finished_at - ml.started_at)::double precision
        FROM model_loads ml
        WHERE ml.server_id = mi.server_id AND ml.model = mi.model AND ml.action = 'load' AND ml.ok
        ORDER BY ml.finished_at DESC LIMIT 1) AS load_seconds
FROM model_instances mi
LEFT JOIN (
    SELECT sl.server_id, sl.model, count(*) FILTER (WHERE sl.job_id IS NOT NULL) AS held,
           max(sl.last_used_at) AS last_taken
    FROM slots sl
    GROUP BY sl.server_id, sl.model
) h ON h.server_id = mi.server_id AND h.model = mi.model
WHERE %(server_id)s::integer IS NULL OR mi.server_id = %(server_id)s::integer
ORDER BY mi.server_id, mi.model;

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

-- cluster_lock_server_slots --
-- Locks a server's slot rows so counts and edits are exact; concurrent claims skip them meanwhile
SELECT id FROM slots WHERE server_id = %(server_id)s ORDER BY id FOR UPDATE;

-- cluster_model_residency --
-- Where a model is resident, and whether claims may use that server now
SELECT mi.server_id, s.name, mi.state, mi.instance_id,
       s.id IN (SELECT u.id FROM usable_servers u) AS usable
FROM model_instances mi
JOIN servers s ON s.id = mi.server_id
WHERE mi.model = %(model)s
ORDER BY s.name;

-- cluster_server_models --
-- The models aibot already records on one server (their names are what the next listing must find)
SELECT model, state, origin, instance_id, parallel, context_length
FROM model_instances WHERE server_id = %(server_id)s ORDER BY model;

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
WHERE j.runnable AND j.model IS NOT NULL AND j.reply IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM model_instances mi
      JOIN usable_servers u ON u.id = mi.server_id
      WHERE mi.model = j.model AND mi.state IN ('loaded', 'loading'))
GROUP BY j.model
ORDER BY min(j.rank);

-- cluster_catalog_get --
-- A model's last known size
SELECT * FROM model_catalog WHERE model = %(model)s;

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

-- cluster_model_demand --
-- Per model: runnable queued jobs, its oldest runnable job's wait, jobs running, arrivals in the last
-- %(window_s)s seconds, recent mean service time, last measured load time: what the demand decisions
-- (aibot.cluster.demand) weigh. Each branch walks a partial index (queued, running, finished).
WITH live AS (
    SELECT j.model, j.state::text AS state, j.available_at, j.created_at,
           j.runnable AND j.reply IS NULL AS waits, NULL::double precision AS service_s
    FROM jobs j WHERE j.state = 'queued' AND j.model IS NOT NULL
    UNION ALL
    SELECT j.model, 'running', j.available_at, j.created_at, false, NULL
    FROM jobs j WHERE j.state = 'running' AND j.model IS NOT NULL
    UNION ALL
    SELECT j.model, 'finished', j.available_at, j.created_at, false,
           CASE WHEN j.state IN ('done', 'skipped') AND j.started_at IS NOT NULL
                THEN extract(epoch FROM coalesce(j.generated_at, j.finished_at) - j.started_at)::double precision END
    FROM jobs j
    WHERE j.finished_at > now() - make_interval(secs => %(window_s)s) AND j.model IS NOT NULL
)
SELECT l.model,
       count(*) FILTER (WHERE l.waits)::integer AS queued,
       coalesce(extract(epoch FROM now() - min(greatest(l.created_at, l.available_at))
                FILTER (WHERE l.waits)), 0)::double precision
           AS oldest_wait_s,
       count(*) FILTER (WHERE l.state = 'running')::integer AS inflight,
       count(*) FILTER (WHERE l.created_at > now() - make_interval(secs => %(window_s)s))::integer AS recent,
       avg(l.service_s) AS service_s,
       (SELECT extract(epoch FROM ml.finished_at - ml.started_at)::double precision
        FROM model_loads ml WHERE ml.model = l.model AND ml.action = 'load' AND ml.ok
        ORDER BY ml.finished_at DESC LIMIT 1) AS load_s
FROM live l
GROUP BY l.model;

-- cluster_dispatch_cap --
-- The cluster-wide cap on generations in flight (NULL: only the slots), and how many run now
SELECT d.max_in_flight,
       (SELECT count(*) FROM jobs j WHERE j.state = 'running' AND j.reply IS NULL)::integer AS generating
FROM dispatch_limits d WHERE d.id;
