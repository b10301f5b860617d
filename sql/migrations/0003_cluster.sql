-- Cluster state extras (aibot.cluster, aibot.model_loader, aibot.health).
--
-- servers.configured_memory_bytes  RAM from config (capabilities.maxMemory), kept apart from the
--                                  effective memory_bytes so a value the server reports wins over it
-- servers.memory_source            where memory_bytes came from: 'server' (its own listing), 'config',
--                                  'host' (psutil, for a server on this machine)
-- model_catalog                    last known size/parallel per model key, so a model that is not loaded
--                                  anywhere can still be placed by its real size
-- backoff_seconds()                the shared backoff delay, also computed in Python by
--                                  aibot.health.backoff_delay (tests check they agree)

ALTER TABLE aibot.servers
    ADD COLUMN configured_memory_bytes bigint,
    ADD COLUMN memory_source text CHECK (memory_source IN ('server', 'config', 'host'));

CREATE TABLE aibot.model_catalog (
    model           text PRIMARY KEY,
    size_bytes      bigint NOT NULL CHECK (size_bytes > 0),
    parallel        integer,
    context_length  integer,
    seen_at         timestamptz NOT NULL DEFAULT now()
);

-- Rebalancing counts and edits the rows of one (server, model) pair.
CREATE INDEX slots_pair ON aibot.slots (server_id, model);
-- Loads/unloads still in progress (or abandoned by a crashed loader).
CREATE INDEX model_loads_open ON aibot.model_loads (server_id, model) WHERE finished_at IS NULL;

CREATE FUNCTION aibot.backoff_seconds(
    p_level  integer,
    p_base   double precision,
    p_cap    double precision,
    p_jitter double precision
) RETURNS double precision
LANGUAGE sql IMMUTABLE
AS $$
    -- min(cap, base * 2^level) * jitter; the exponent is clamped so huge levels cannot overflow.
    SELECT least(p_cap, p_base * power(2::double precision, least(greatest(p_level, 0), 60))) * p_jitter
$$;

COMMENT ON FUNCTION aibot.backoff_seconds(integer, double precision, double precision, double precision) IS
    'Shared server backoff delay: min(cap, base * 2^level) * jitter (mirrors aibot.health.backoff_delay).';
