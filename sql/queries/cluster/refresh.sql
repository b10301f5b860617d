-- Servers from config and what each one holds (aibot.cluster.refresh).

-- cluster_upsert_server --
-- Writes a server's config and the sizing's safety margin for it; health/backoff columns are left to aibot.cluster.health
INSERT INTO servers (name, url, kind, enabled, configured_memory_bytes, memory_bytes, memory_source,
                     system_reserve_bytes, safety_fraction, safety_bytes, per_request_bytes, hard_cap,
                     default_parallel, token_env, configured_max_loaded, max_loaded)
VALUES (%(name)s, %(url)s, %(kind)s, %(enabled)s, %(configured_memory_bytes)s, %(memory_bytes)s,
        %(memory_source)s, %(system_reserve_bytes)s, %(safety_fraction)s, %(safety_bytes)s, %(per_request_bytes)s,
        %(hard_cap)s, %(default_parallel)s, %(token_env)s, %(configured_max_loaded)s, %(configured_max_loaded)s)
ON CONFLICT (name) DO UPDATE SET
    url = EXCLUDED.url,
    kind = EXCLUDED.kind,
    enabled = EXCLUDED.enabled,
    configured_memory_bytes = EXCLUDED.configured_memory_bytes,
    memory_bytes = EXCLUDED.memory_bytes,
    memory_source = EXCLUDED.memory_source,
    system_reserve_bytes = EXCLUDED.system_reserve_bytes,
    safety_fraction = EXCLUDED.safety_fraction,
    safety_bytes = EXCLUDED.safety_bytes,
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

-- cluster_set_catalogue --
-- What a refresh learnt about a server as a whole: the offered names' fingerprint and its own eviction bound
UPDATE servers
SET catalogue_fingerprint = %(fingerprint)s, max_loaded = coalesce(%(max_loaded)s, configured_max_loaded)
WHERE id = %(server_id)s;

-- cluster_wanted_models --
-- Model names queued or running work needs: a refresh looks each of them up in every server's catalogue
SELECT DISTINCT model FROM jobs WHERE state IN ('queued', 'running') AND model IS NOT NULL;

-- cluster_delete_vanished_instances --
-- Forgets models the server no longer lists, except 'loading' rows: a server lists a model only once it is
-- loaded, so a row still loading is either a live loader's (it holds the lock) or a dead loader's whose HTTP
-- load may yet finish there. Forgetting the latter let the next loader load a second instance beside it;
-- orphans are the loader's to settle (aibot.cluster.loader.reap_orphan_loads: adopted, or cleaned up past
-- the orphan grace)
DELETE FROM model_instances mi
WHERE mi.server_id = %(server_id)s
  AND NOT (mi.model = ANY (%(models)s::text[]))
  AND mi.state <> 'loading'
RETURNING mi.model, mi.state;

-- cluster_set_memory --
-- Records a server's effective RAM (with the sizing's safety margin for it) and when its models were last listed
UPDATE servers
SET memory_bytes = %(memory_bytes)s, memory_source = %(memory_source)s, safety_bytes = %(safety_bytes)s,
    refreshed_at = now(), updated_at = now()
WHERE id = %(server_id)s;

-- cluster_set_dispatch_cap --
-- queueSettings.maxConcurrentWorkers as the cluster-wide cap on generations in flight (NULL: none),
-- read by claim_jobs (0009_scheduling.sql); returns the row only when it changed
UPDATE dispatch_limits SET max_in_flight = %(cap)s, updated_at = now()
WHERE id AND max_in_flight IS DISTINCT FROM %(cap)s::integer
RETURNING max_in_flight;
