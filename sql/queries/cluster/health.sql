-- Shared per-server and per-(server, model) health and backoff (aibot.cluster.health).

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
