-- Rules stated once (issue 11).
--
-- servers.kind       no CHECK constraint: the kinds are the backend classes aibot.backends.registry
--                    finds, and sync_servers refuses any other kind naming the server; a migration per
--                    new kind is no longer needed.
-- servers.safety_bytes  the sizing's safety margin for the server's current RAM, reserve and fraction,
--                    written by aibot.cluster.refresh from aibot.cluster.sizing (Budget.safety_bytes:
--                    safety_fraction × (RAM − system reserve), rounded up) whenever one of them changes.
--                    NULL until the server is next synced or refreshed.
-- server_health      accounts that stored margin instead of its own 10 % of the whole RAM, so
--                    accounted_bytes is exactly sizing's accounted_bytes(models, in-flight requests)
--                    and budget_left_bytes < 0 again means the invariant is broken, not a drifted copy.

ALTER TABLE aibot.servers DROP CONSTRAINT IF EXISTS servers_kind_check;

ALTER TABLE aibot.servers
    ADD COLUMN safety_bytes bigint CHECK (safety_bytes >= 0);

COMMENT ON COLUMN aibot.servers.safety_bytes IS
    'Safety margin of the sizing formula for this server (aibot.cluster.sizing), stored by the refresh; NULL = not sized yet.';

CREATE OR REPLACE VIEW aibot.server_health AS
WITH inst AS (
    SELECT server_id, count(*)::bigint AS models_loaded, coalesce(sum(size_bytes), 0)::bigint AS models_bytes
    FROM aibot.model_instances GROUP BY server_id
), sl AS (
    SELECT server_id,
           count(*) FILTER (WHERE NOT retired)::bigint        AS slots_total,
           count(*) FILTER (WHERE job_id IS NOT NULL)::bigint AS slots_used
    FROM aibot.slots GROUP BY server_id
), acc AS (
    SELECT s.*,
           coalesce(inst.models_loaded, 0) AS models_loaded,
           coalesce(inst.models_bytes, 0)  AS models_bytes,
           coalesce(sl.slots_total, 0)     AS slots_total,
           coalesce(sl.slots_used, 0)      AS slots_used
    FROM aibot.servers s
    LEFT JOIN inst ON inst.server_id = s.id
    LEFT JOIN sl ON sl.server_id = s.id
)
SELECT id, name, url, kind, enabled, draining, health, failure_count, backoff_level, backoff_until,
       greatest(extract(epoch FROM backoff_until - now()), 0)::double precision AS backoff_left_seconds,
       last_ok_at, last_error, refreshed_at,
       memory_bytes, models_loaded, models_bytes, slots_total, slots_used,
       (slots_used * per_request_bytes)::bigint AS inflight_bytes,
       (models_bytes + slots_used * per_request_bytes + system_reserve_bytes + safety_bytes)::bigint
           AS accounted_bytes,
       (memory_bytes - (models_bytes + slots_used * per_request_bytes + system_reserve_bytes + safety_bytes))::bigint
           AS budget_left_bytes,
       CASE WHEN NOT enabled THEN 'disabled'
            WHEN draining THEN 'draining'
            WHEN health = 'down' THEN 'down'
            WHEN backoff_until > now() THEN 'backoff'
            ELSE health END AS status,
       safety_bytes
FROM acc
ORDER BY name;

COMMENT ON VIEW aibot.server_health IS
    'Per server: health, backoff, draining, and accounted memory (models + in-flight buffers + reserve + the '
    'sizing''s safety margin); budget_left_bytes < 0 means the memory invariant is broken.';
